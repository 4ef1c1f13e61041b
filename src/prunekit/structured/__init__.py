"""Only-Train-Once structured pruning: zero-invariant groups and the slim model.

``groups = find_groups(model, example_inputs)`` finds every zero-invariant group automatically;
:class:`HSPG`, :class:`DHSPG` and :class:`HESSO` train while driving whole groups to exactly zero;
``slim(model, example_inputs)`` builds the physically smaller network whose output equals the
group-sparse model's; layers left with no channels are folded (:class:`FoldedConv`), so a residual
branch whose inner channels are all zero disappears — with ``HESSO(may_empty=emptiable(...))`` the
optimizer prunes depth as well as width.
"""

from torch import nn

from prunekit.structured.attention import SlimMultiheadAttention, fix_mha, mha_rule
from prunekit.structured.channels import Member
from prunekit.structured.folded import FoldedConv, folded_rule
from prunekit.structured.group_index import GroupIndex
from prunekit.structured.groups import (
    CaptureError,
    Group,
    capture,
    find_groups,
    group_macs,
    macs_rates,
)
from prunekit.structured.hesso import flops_target
from prunekit.structured.module_rules import register_module_rule
from prunekit.structured.optim import (
    DHSPG,
    HESSO,
    HSPG,
    DHSPGConfig,
    GroupSparseOptimizer,
    HESSOConfig,
    HSPGConfig,
    available_structured,
    build_structured,
    config_from_section,
    get_structured,
    register_structured,
)
from prunekit.structured.slim import (
    SlimError,
    SlimPlan,
    emptiable,
    register_fixup,
    removal_plan,
    slim,
    slim_with_plan,
)

register_module_rule(nn.MultiheadAttention, mha_rule)
register_module_rule(SlimMultiheadAttention, mha_rule)
register_fixup(nn.MultiheadAttention, fix_mha)
register_fixup(SlimMultiheadAttention, fix_mha)
register_module_rule(FoldedConv, folded_rule)

__all__ = [
    "DHSPG",
    "HESSO",
    "HSPG",
    "CaptureError",
    "DHSPGConfig",
    "FoldedConv",
    "Group",
    "GroupIndex",
    "GroupSparseOptimizer",
    "HESSOConfig",
    "HSPGConfig",
    "Member",
    "SlimError",
    "SlimMultiheadAttention",
    "SlimPlan",
    "available_structured",
    "build_structured",
    "capture",
    "config_from_section",
    "emptiable",
    "find_groups",
    "flops_target",
    "get_structured",
    "group_macs",
    "macs_rates",
    "register_fixup",
    "register_module_rule",
    "register_structured",
    "removal_plan",
    "slim",
    "slim_with_plan",
]
