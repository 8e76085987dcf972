"""`python -m vitcli` is the `vit` command (torchrun -m vitcli ... uses this)."""

from vitcli.cli import main

main()
