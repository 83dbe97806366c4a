"""The kdcore hooks of kdcore-ptloss."""

from __future__ import annotations

from kdcore import hookimpl
from kdcore_ptloss.command import add_search_command
from kdcore_ptloss.loss import PTLoss
from kdcore_ptloss.proxy import ProxyTeacher


@hookimpl
def register_losses(register):
    register("ptloss", PTLoss)


@hookimpl
def register_transforms(register):
    register("ptloss_proxy", ProxyTeacher)


@hookimpl
def register_commands(cli):
    add_search_command(cli)
