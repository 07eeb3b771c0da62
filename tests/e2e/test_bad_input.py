"""Bad input as a user meets it: `quantlab run ...` stops within seconds with exit code 2 and
one line that names the bad value (and the valid ones), no traceback, and the store as it was.

Data, checkpoint, settings and store cases stop in preflight, before Prefect starts; they run
through `quantlab_cli` (a new process per command, tests/cli_zygote.py). An undecodable image
is found while staging, inside the flow, so that case runs the real command under the
session's Prefect API. Permission and credential cases use a moto server of their own that
enforces IAM after its first requests (INITIAL_NO_AUTH_ACTION_COUNT).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import boto3
import pytest
import torch
import yaml

from quantlab import models, registry
from quantlab.store import Store
from tests.support import free_port, make_config, write_tiny_dataset


class Evil:
    """A pickle that runs a command when unpickled unsafely."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _save(obj, path) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_dataset, tiny_checkpoint):
    """A good run config, a local store that holds an earlier run, and bad files of each kind."""
    tmp = tmp_path_factory.mktemp("bad-input")
    store = Store(str(tmp / "store"))
    store.write_json("runs/earlier/run.json", {"run_id": "earlier"})
    cfg = make_config(tiny_dataset, tiny_checkpoint, store.root, str(tmp / "cache"))
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    (tmp / "empty").mkdir()
    no_val = write_tiny_dataset(str(tmp / "no-val"), per_class=(2, 1))
    shutil.rmtree(os.path.join(no_val, "val"))
    differ = write_tiny_dataset(str(tmp / "differ"), per_class=(2, 1))
    os.rename(os.path.join(differ, "val", "cross"), os.path.join(differ, "val", "plus"))
    empty_class = write_tiny_dataset(str(tmp / "empty-class"), per_class=(2, 1))
    for png in os.listdir(os.path.join(empty_class, "val", "square")):
        os.remove(os.path.join(empty_class, "val", "square", png))
    (tmp / "notes.txt").write_text("not a checkpoint")
    return SimpleNamespace(
        tmp=tmp, store=store.root, config=str(config), settings=cfg.model_dump(mode="json"),
        no_val=no_val, differ=differ, empty_class=empty_class,
        evil=_save({"model": Evil()}, tmp / "evil.pth"),
        shufflenet=_save(models.build("shufflenet_v2_x0_5", 3).state_dict(), tmp / "shufflenet.pth"),
        ten_classes=_save(models.build("mobilenet_v2", 10, width_mult=0.25).state_dict(),
                          tmp / "ten.pth"))


def patched_config(i: SimpleNamespace, name: str, patch: dict) -> str:
    """The good config with some top-level sections replaced or updated."""
    data = json.loads(json.dumps(i.settings))
    for key, value in patch.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path = i.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def listing(root: str) -> list[tuple[str, int, int]]:
    """Every file below a local folder (hidden ones too): path, size, mtime."""
    out = []
    for folder, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(folder, name))
            out.append((os.path.relpath(os.path.join(folder, name), root), st.st_size, st.st_mtime_ns))
    return sorted(out)


def bucket_listing(endpoint: str, bucket: str, key: str, secret: str) -> list[tuple[str, str]]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=key, aws_secret_access_key=secret)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted((o["Key"], o["ETag"]) for page in pages for o in page.get("Contents", []))


def check_refused(out: subprocess.CompletedProcess, needle: str | tuple[str, ...],
                  secrets: tuple[str, ...] = ()):
    """Exit code 2, one line on stderr that says `needle`(s), no traceback, no secret."""
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    for part in (needle,) if isinstance(needle, str) else needle:
        assert part in lines[0], lines[0]
    assert "Traceback" not in text
    for secret in secrets:
        assert secret not in text


# case -> (arguments after `quantlab run`, what the one line must say)
LOCAL_CASES = {
    "data path missing": lambda i: (
        [i.config, "--data", f"{i.tmp}/nowhere"],
        f"dataset {i.tmp}/nowhere does not exist or is empty; expected train/<class>/<image>"),
    "data path empty": lambda i: (
        [i.config, "--data", f"{i.tmp}/empty"], f"dataset {i.tmp}/empty does not exist or is empty"),
    "a required setting missing": lambda i: (
        ["--checkpoint", f"{i.tmp}/nope.pth", "--store", i.store], "data: required setting is missing"),
    "data URI empty": lambda i: (
        [i.config, "--data", ""], "data.uri: String should have at least 1 character"),
    "no val/": lambda i: (
        [i.config, "--data", i.no_val], f"dataset {i.no_val} has no val/ folder with class folders"),
    "classes differ": lambda i: (
        [i.config, "--data", i.differ],
        "classes differ between train/ and val/ (only in train: ['cross']; only in val: ['plus'])"),
    "a class folder without images": lambda i: (
        [i.config, "--data", i.empty_class], f"dataset {i.empty_class}: val/square has no images"),
    "checkpoint missing": lambda i: (
        [i.config, "--checkpoint", f"{i.tmp}/nope.pth"], f"checkpoint {i.tmp}/nope.pth does not exist"),
    "checkpoint not a torch file": lambda i: (
        [i.config, "--checkpoint", f"{i.tmp}/notes.txt"], f"checkpoint {i.tmp}/notes.txt is not a torch file"),
    "checkpoint refused by weights_only": lambda i: (
        [i.config, "--checkpoint", i.evil],
        f"checkpoint {i.evil} was refused by torch.load(weights_only=True): Trying to load "
        "unsupported GLOBAL posix.system whose module posix is blocked."),
    "architecture mismatch": lambda i: (
        [i.config, "--checkpoint", i.shufflenet],
        (f"checkpoint {i.shufflenet} does not fit mobilenet_v2: ",
         "missing keys (e.g. features.0.0.weight, features.0.1.weight, features.0.1.bias)",
         "unexpected keys (e.g. conv1.0.weight, conv1.1.weight, conv1.1.bias)")),
    "num_classes differs": lambda i: (
        [i.config, "--checkpoint", i.ten_classes],
        f"checkpoint {i.ten_classes} has 10 classes but the dataset has 3"),
    "unknown model": lambda i: (
        [i.config, "--model", "vgg16"],
        "model.name: unknown model 'vgg16'; valid: mobilenet_v2, mobilenet_v3_large, resnet18"),
    "unknown model, config given with --config": lambda i: (
        ["--config", patched_config(i, "vgg", {"model": {"name": "vgg16"}})],
        "model.name: unknown model 'vgg16'; valid: mobilenet_v2"),
    "unknown variant": lambda i: (
        [patched_config(i, "variant", {"variants": ["ptq-fast"]})],
        "unknown variant 'ptq-fast'; presets: ptq-minmax, ptq-x86"),
    "unknown engine": lambda i: (
        [patched_config(i, "engine", {"variants": [{"name": "ptq-tpu", "engine": "tpu"}]})],
        "unknown engine 'tpu'; valid: x86, fbgemm, qnnpack, onednn"),
    "epochs < 1": lambda i: (
        [i.config, "--qat-epochs", "0"], "qat.epochs: Input should be greater than or equal to 1 (got 0)"),
    "freeze epochs beyond the run": lambda i: (
        [patched_config(i, "freeze", {"qat": {"epochs": 2, "freeze_observers_after": 3}})],
        "qat.freeze_observers_after=3 is beyond the run's 2 epochs; valid: 1..2"),
    "world size < 1": lambda i: (
        [i.config, "--nproc-per-node", "0"], "qat.nproc_per_node: Input should be greater than or equal to 1"),
    "batch size < 1": lambda i: (
        [patched_config(i, "batch", {"data": {"batch_size": 0}})],
        "data.batch_size: Input should be greater than or equal to 1 (got 0)"),
    "multi-node QAT without a rendezvous": lambda i: (
        [patched_config(i, "nnodes", {"qat": {"nnodes": "2"}})],
        "qat.nnodes=2 needs qat.rdzv_endpoint (HOST:PORT of the c10d rendezvous"),
    "max_accuracy_drop < 0": lambda i: (
        [patched_config(i, "drop", {"max_accuracy_drop": -1})],
        "max_accuracy_drop: Input should be greater than or equal to 0 (got -1)"),
    "gate latency attempts < 1": lambda i: (
        [patched_config(i, "gate", {"gate": {"latency_attempts": 0}})],
        "gate.latency_attempts: Input should be greater than or equal to 1 (got 0)"),
    "sensitivity variant unknown": lambda i: (
        [patched_config(i, "sensitivity", {"sensitivity": {"variant": "ptq-nope"}})],
        "sensitivity.variant 'ptq-nope' is not one of the run's PTQ variants; valid: "
        "ptq-minmax, ptq-x86"),
}


@pytest.mark.parametrize("case", LOCAL_CASES)
def test_bad_input_stops_with_one_line_and_leaves_the_store_alone(case, inputs, quantlab_cli):
    args, needle = LOCAL_CASES[case](inputs)
    before = listing(inputs.store)
    check_refused(quantlab_cli("run", *args), needle)
    assert listing(inputs.store) == before


def test_unknown_run_or_alias(inputs, quantlab_cli):
    for command in ("show", "pull"):
        check_refused(quantlab_cli(command, "nope", "--store", inputs.store),
                      "'nope' is neither a complete run nor an alias")


def test_engine_this_cpu_does_not_support(inputs, quantlab_cli):
    # This machine supports every engine; the child's torch reports an ARM build's list instead.
    out = quantlab_cli("run", inputs.config, supported_engines=["qnnpack", "none"])
    check_refused(out, "quantization engine 'x86' is not supported here; valid: qnnpack")


def test_data_uri_on_s3_that_holds_nothing(inputs, s3_bucket, quantlab_cli):
    out = quantlab_cli("run", inputs.config, "--data", f"s3://{s3_bucket}/datasets/none")
    check_refused(out, f"dataset s3://{s3_bucket}/datasets/none does not exist or is empty")


def test_store_unreachable_or_bucket_missing(inputs, s3_endpoint, quantlab_cli):
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "QUANTLAB_STORAGE_OPTIONS": None}
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    out = quantlab_cli("run", inputs.config, "--store", "s3://lab/x",
                       env={**env, "AWS_ENDPOINT_URL": nothing_listens})
    check_refused(out, "the store is unreachable or overloaded (EndpointConnectionError) after 4 "
                       "attempts in 3.5 s")
    assert out.stderr.startswith("error: cannot write s3://lab/x/.quantlab-probe-")
    out = quantlab_cli("run", inputs.config, "--store", "s3://quantlab-no-such-bucket/lab",
                       env={**env, "AWS_ENDPOINT_URL": s3_endpoint})
    check_refused(out, "no such bucket")


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """A moto server that enforces IAM after the 3 requests that create an admin user.

    Then every request must be signed by a known key, and its user's policy must allow it:
    bucket `lab` holds one object; `reader` may only get and list.
    """
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto-iam") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "moto did not start"
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"

        def client(service: str, key: str = "bootstrap", secret: str = "bootstrap"):
            return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                                aws_access_key_id=key, aws_secret_access_key=secret)

        def user(iam, name: str, actions) -> tuple[str, str]:
            iam.create_user(UserName=name)
            iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(
                {"Version": "2012-10-17",
                 "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=name)["AccessKey"]
            return key["AccessKeyId"], key["SecretAccessKey"]

        admin = user(client("iam"), "admin", "*")  # the 3 unauthenticated requests
        client("s3", *admin).create_bucket(Bucket="lab")
        client("s3", *admin).put_object(Bucket="lab", Key="lab/keep.txt", Body=b"kept")
        reader = user(client("iam", *admin), "reader", ["s3:GetObject", "s3:ListBucket"])
        with pytest.raises(Exception, match="InvalidClientTokenId|InvalidAccessKeyId|AccessDenied"):
            client("s3").list_objects_v2(Bucket="lab")  # auth is really on
        yield SimpleNamespace(endpoint=endpoint, admin=admin, reader=reader)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("who, needle", [
    ("reader", "permission denied (AccessDenied); the credentials were accepted but may not do this"),
    ("unknown key", "the credentials were rejected (InvalidAccessKeyId)"),
    ("wrong secret", "the credentials were rejected (SignatureDoesNotMatch)"),
])
def test_store_refuses_the_credentials(who, needle, inputs, iam_s3, quantlab_cli):
    key, secret = {"reader": iam_s3.reader, "unknown key": ("AKIAQLUNKNOWN0000000", "ql-unknown/Secret"),
                   "wrong secret": (iam_s3.admin[0], "ql-wrong/Secret-9d2f")}[who]
    env = {"AWS_ENDPOINT_URL": iam_s3.endpoint, "AWS_ACCESS_KEY_ID": key,
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "QUANTLAB_STORAGE_OPTIONS": None}
    before = bucket_listing(iam_s3.endpoint, "lab", *iam_s3.admin)
    out = quantlab_cli("run", inputs.config, "--store", "s3://lab/lab", env=env)
    check_refused(out, needle, secrets=(secret,))
    assert bucket_listing(iam_s3.endpoint, "lab", *iam_s3.admin) == before == [
        ("lab/keep.txt", before[0][1])]
    # The same refusal when the credentials come as --storage-option: never echoed either.
    out = quantlab_cli("runs", "--store", "s3://lab/lab", "--storage-option", f"key={key}",
                       "--storage-option", f"secret={secret}",
                       env={**env, "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None})
    if who == "reader":
        assert out.returncode == 0, out.stderr  # reading is allowed
    else:
        check_refused(out, needle, secrets=(secret,))


def test_undecodable_image_is_named_before_the_run_starts(prefect, inputs, tiny_dataset, tmp_path):
    from prefect.settings import PREFECT_API_URL

    data = shutil.copytree(tiny_dataset, tmp_path / "data")
    bad = data / "val" / "circle" / "003.png"
    bad.write_bytes(bad.read_bytes()[:100])  # cut off, like an interrupted copy
    store = Store(str(tmp_path / "store"))
    store.write_json("runs/earlier/run.json", {"run_id": "earlier"})
    before = listing(store.root)
    # The run that skips the image needs no sensitivity analysis or gate to show it.
    config = patched_config(inputs, "lean", {"sensitivity": {"enabled": False},
                                             "gate": {"enabled": False}})

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "quantlab_cli.app", "run", config, "--data", str(data),
             "--store", store.root, "--no-qat", *args], capture_output=True, text=True,
            env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "200"})

    out = run()
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: 1 image(s) in {data} cannot be decoded: {bad} (OSError: image file is "
        "truncated); fix or remove them, or leave them out with --skip-bad-images "
        "(data.skip_bad_images: true)")
    assert "Traceback" not in text
    assert listing(store.root) == before  # not even run.json: staging comes first

    out = run("--skip-bad-images")  # left out, and reported
    assert out.returncode == 0, out.stdout + out.stderr
    assert "left out 1 undecodable image(s): val/circle/003.png" in out.stderr
    [m] = registry.list_runs(store)
    assert m.dataset.skipped_images == ["val/circle/003.png"]
    assert (m.dataset.num_train, m.dataset.num_val) == (72, 23)
    out = subprocess.run([sys.executable, "-m", "quantlab_cli.app", "show", m.run_id, "--store",
                          store.root], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert "1 undecodable image(s) left out: val/circle/003.png" in out.stdout, out.stderr


@pytest.mark.parametrize("args, needle", [
    (["--engines", "x86,avx"], "engines: unknown engine 'avx'; valid: x86, fbgemm"),
    (["--threads", "1,two"], "--threads '1,two' must be a comma-separated list of ints"),
    (["--model", "vgg16"], "unknown model 'vgg16'; valid: mobilenet_v2"),
])
def test_bench_refuses_bad_settings(args, needle, tmp_path, quantlab_cli):
    check_refused(quantlab_cli("bench", *args, "--store", str(tmp_path / "store")), needle)
    assert not (tmp_path / "store").exists()


def test_announce_refuses_a_checkpoint_it_cannot_read(s3_endpoint, quantlab_cli, tmp_path):
    """One line, exit 2, before Prefect is imported or an event is emitted."""
    out = quantlab_cli("announce", str(tmp_path / "nope" / "model.pth"), "--model", "mobilenet_v2")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "nope/model.pth does not exist" in out.stderr and "emitted" not in out.stdout
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    out = quantlab_cli("announce", "s3://no-such-bucket-here/m/model.pth", "--model",
                       "mobilenet_v2", env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "s3://no-such-bucket-here/m/model.pth" in out.stderr
    out = quantlab_cli("announce", str(tmp_path), "--model", "../x")
    assert out.returncode == 2 and "--model '../x' is not a model name" in out.stderr
