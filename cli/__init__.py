"""The `quantlab` command line, the top of the house: cli -> flows -> tasks -> quantlab.

Installed as the package `quantlab_cli` (flows/ and tasks/ as `quantlab_flows` and
`quantlab_tasks`), so that no plain `cli`, `flows` or `tasks` lands in site-packages.
"""
