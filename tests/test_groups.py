"""group_parameters: which parameters each reported signal/noise value sums over."""

from __future__ import annotations

import warnings

import pytest
import torch

from snrmon import group_parameters
from snrmon.measure.groups import TOTAL

NAMES = [
    "embed.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.qkv.bias",
    "blocks.0.mlp.fc.weight",
    "blocks.1.attn.qkv.weight",
    "blocks.1.mlp.fc.weight",
    "head.weight",
]


def members(group_names: list[str], membership: torch.Tensor, group: str) -> list[str]:
    row = membership[group_names.index(group)]
    return [name for name, flag in zip(NAMES, row.tolist(), strict=True) if flag]


def assert_valid_membership(group_names: list[str], membership: torch.Tensor) -> None:
    assert group_names[0] == TOTAL
    assert membership.shape == (len(group_names), len(NAMES))
    assert set(membership.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(membership[0], torch.ones(len(NAMES)))
    # Every parameter is in at most one group besides the total.
    assert (membership[1:].sum(0) <= 1).all()


def test_none_gives_the_total_only():
    group_names, membership = group_parameters(NAMES, None)
    assert group_names == [TOTAL]
    assert_valid_membership(group_names, membership)


def test_membership_sums_per_parameter_squared_norms_per_group():
    group_names, membership = group_parameters(NAMES, 1)
    sq_norms = torch.arange(1.0, len(NAMES) + 1)
    per_group = membership @ sq_norms
    assert per_group[0] == sq_norms.sum()
    assert per_group[1:].sum() == sq_norms.sum()  # depth groups partition the parameters
    assert per_group[group_names.index("head")] == sq_norms[NAMES.index("head.weight")]


@pytest.mark.parametrize(
    ("depth", "expected"),
    [
        (1, [TOTAL, "embed", "blocks", "head"]),
        (2, [TOTAL, "embed.weight", "blocks.0", "blocks.1", "head.weight"]),
        (
            3,
            [
                TOTAL,
                "embed.weight",
                "blocks.0.attn",
                "blocks.0.mlp",
                "blocks.1.attn",
                "blocks.1.mlp",
                "head.weight",
            ],
        ),
    ],
)
def test_int_depth_groups_by_leading_name_components(depth, expected):
    group_names, membership = group_parameters(NAMES, depth)
    assert group_names == expected  # in order of first appearance
    assert_valid_membership(group_names, membership)
    assert membership[1:].sum(0).tolist() == [1.0] * len(NAMES)
    if depth == 2:
        assert members(group_names, membership, "blocks.0") == [
            "blocks.0.attn.qkv.weight",
            "blocks.0.attn.qkv.bias",
            "blocks.0.mlp.fc.weight",
        ]


def test_depth_deeper_than_names_uses_full_names():
    group_names, _ = group_parameters(["a.b", "c"], 5)
    assert group_names == [TOTAL, "a.b", "c"]


@pytest.mark.parametrize("depth", [0, -1, True, False])
def test_bad_depth_raises(depth):
    with pytest.raises(ValueError, match="depth"):
        group_parameters(NAMES, depth)


def test_regex_groups_first_match_wins_and_unmatched_parameters_are_in_total_only():
    groups = {"attention": r"attn", "block0": r"^blocks\.0\.", "mlp": r"mlp"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every group matches something: no warning
        group_names, membership = group_parameters(NAMES, groups)
    assert group_names == [TOTAL, "attention", "block0", "mlp"]
    assert_valid_membership(group_names, membership)
    # blocks.0.attn.* match both "attention" and "block0": the first listed group takes them.
    assert members(group_names, membership, "attention") == [
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.1.attn.qkv.weight",
    ]
    assert members(group_names, membership, "block0") == ["blocks.0.mlp.fc.weight"]
    assert members(group_names, membership, "mlp") == ["blocks.1.mlp.fc.weight"]
    # embed and head match nothing: counted in the total only.
    unmatched = [NAMES.index("embed.weight"), NAMES.index("head.weight")]
    assert membership[1:, unmatched].sum() == 0


def test_regex_uses_search_not_match():
    group_names, membership = group_parameters(NAMES, {"weights": r"weight$"})
    assert members(group_names, membership, "weights") == [n for n in NAMES if n.endswith("weight")]


def test_unmatched_regex_group_warns_and_is_dropped():
    with pytest.warns(UserWarning, match="nothing_here"):
        group_names, membership = group_parameters(NAMES, {"head": r"^head", "nothing_here": r"xyz"})
    assert group_names == [TOTAL, "head"]
    assert membership.shape == (2, len(NAMES))


def test_shadowed_regex_group_warns():
    """A group whose every match is taken by an earlier group also matches no parameter."""
    with pytest.warns(UserWarning, match="late"):
        group_names, _ = group_parameters(NAMES, {"early": r"attn", "late": r"qkv"})
    assert group_names == [TOTAL, "early"]


def test_total_is_reserved():
    with pytest.raises(ValueError, match="reserved"):
        group_parameters(NAMES, {TOTAL: r"head"})


def test_total_reserved_for_depth_groups_too():
    with pytest.raises(ValueError, match="reserved"):
        group_parameters(["total.weight", "other.weight"], 1)


def test_bad_regex_raises():
    with pytest.raises(ValueError, match="not a valid regex"):
        group_parameters(NAMES, {"broken": r"(attn"})


def test_empty_names():
    group_names, membership = group_parameters([], 1)
    assert group_names == [TOTAL]
    assert membership.shape == (1, 0)
