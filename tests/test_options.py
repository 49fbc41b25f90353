"""The command line's method options come from the option dataclasses (dropinf.options)."""

import argparse
import dataclasses
from typing import Literal

import pytest

import dropinf
from dropinf.cli import build_parser
from dropinf.methods import COMPRESSORS, ESTIMATORS
from dropinf.options import add_options, build, cli_fields, option


def test_a_new_field_is_a_new_flag():
    @dataclasses.dataclass(frozen=True)
    class Throwaway:
        strength: float = option(0.5, "how strong")
        mode: Literal["a", "b"] = option("a", "which way", flag="--throwaway-mode")
        verbose: bool = option(False, "say more")
        name: str = "throwaway"                 # no help text: no flag

    @dataclasses.dataclass(frozen=True)
    class Other:
        strength: float = option(0.5, "how strong")

    p = argparse.ArgumentParser()
    add_options(p, {"throwaway": Throwaway, "other": Other})
    text = p.format_help()
    assert "--strength" in text and "--throwaway-mode {a,b}" in text and "--verbose" in text
    assert "--name" not in text and "throwaway: which way" in text and "(default: 0.5)" in text
    args = p.parse_args(["--strength", "2", "--throwaway-mode", "b", "--verbose"])
    assert build(Throwaway, args) == Throwaway(strength=2.0, mode="b", verbose=True)
    assert build(Other, p.parse_args([])) == Other()
    with pytest.raises(SystemExit):
        p.parse_args(["--throwaway-mode", "c"])


def _help(cmd: str) -> str:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[cmd].format_help()


@pytest.mark.parametrize("cmd", ["score", "topk", "report"])
def test_every_estimator_option_is_on_the_command_line(cmd):
    text = _help(cmd)
    for name, cls in ESTIMATORS.items():
        assert name in text
        for f in cli_fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert flag in text, (name, f.name)


def test_every_compressor_option_is_on_the_command_line():
    text = _help("featurize")
    for name, cls in COMPRESSORS.items():
        assert name in text
        for f in cli_fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            flag = flag if isinstance(flag, str) else flag[0]
            assert flag in text, (name, f.name)


def test_help_shows_the_command_lines_own_default_where_it_is_not_the_class_default():
    """--help says what an unset flag gives on the command line (which starts from
    dropinf.default_setting()), not the dataclass default."""
    from dropinf.compress.dropout import DEFAULT_HEAD_FACTOR
    from dropinf.methods import DEFAULT_HEAD_DAMPING, DEFAULT_MEMBERS
    squash = lambda t: " ".join(t.split())
    assert f"(default: {DEFAULT_HEAD_FACTOR}, the measured default; Dropout() in Python: 1)" in squash(_help("featurize"))
    text = squash(_help("score"))
    assert f"(default: {DEFAULT_MEMBERS} without --estimator, 1 with --estimator gauss-newton)" in text
    assert f"(default: {DEFAULT_HEAD_DAMPING} without --estimator, 1 with --estimator gauss-newton)" in text


def test_one_spelling_per_method():
    assert all(cls().name == key for key, cls in ESTIMATORS.items())
    assert all(cls().kind == key for key, cls in COMPRESSORS.items())


def test_cli_builds_the_same_objects_as_before():
    from dropinf import Dropout, ExactHessian, GaussNewton, LiSSA, LoGra
    from dropinf.cli import _compressor, _estimator
    parse = build_parser().parse_args
    a = parse(["topk", "m:f", "--store", "s", "--estimator", "lissa", "--lissa-scale", "1", "--iterations", "3"])
    assert _estimator(a) == LiSSA(iterations=3, scale=1.0)
    assert _estimator(parse(["topk", "m:f", "--store", "s", "--estimator", "exact"])) == ExactHessian()
    # no --estimator: the measured default (dropinf.default_setting()), with the flags given applied to it
    assert _estimator(parse(["score", "m:f", "--store", "s", "--out", "x.npy", "--damping", "0.3"])) == \
        GaussNewton(damping=0.3, members=4, head_damping=0.03)
    assert _estimator(parse(["score", "m:f", "--store", "s", "--out", "x.npy", "--members", "1"])) == \
        GaussNewton(head_damping=0.03)
    assert _estimator(parse(["score", "m:f", "--store", "s", "--out", "x.npy", "--head-damping", "1"])) == \
        GaussNewton(members=4)
    # --member-size replaces the default's members (the mislabel estimator), unless --members is given too
    assert _estimator(parse(["score", "m:f", "--store", "s", "--out", "x.npy", "--member-size", "8"])) == \
        GaussNewton(member_size=8)
    assert _estimator(parse(["topk", "m:f", "--store", "s", "--estimator", "gauss-newton", "--damping", "0.3"])) == \
        GaussNewton(damping=0.3)
    assert _compressor(parse(["featurize", "m:f", "--store", "s", "--size", "32", "--rotate"])) == \
        Dropout(r=32, rotate=True, head_factor=4)
    # no compressor flags: the default setting's compressor; --head-factor 1 is the paper's uniform r
    assert _compressor(parse(["featurize", "m:f", "--store", "s"])) == dropinf.default_setting()[0]
    assert _compressor(parse(["featurize", "m:f", "--store", "s", "--head-factor", "1"])) == Dropout()
    assert _compressor(parse(["featurize", "m:f", "--store", "s", "--compressor", "logra", "--r-in", "4"])) == \
        LoGra(r_in=4)


def test_phase_options_refuse_unknown_fields_and_keep_keyword_sugar():
    from dropinf import BudgetOptions, ConfigError, ReportOptions
    from dropinf.store.budget import split_budget
    assert ReportOptions.of(None, k=3, title="t") == ReportOptions(k=3, title="t")
    with pytest.raises(ConfigError, match="unknown option.*'kk'"):
        ReportOptions.of(None, kk=3)
    with pytest.raises(ConfigError, match="k must be"):
        ReportOptions.of(ReportOptions(), k=0)
    with pytest.raises(ConfigError, match="BudgetOptions has"):
        split_budget(None, None, [], 10, options=BudgetOptions(), pilot=3)


def test_store_report_and_scoring_flags_come_from_their_dataclasses():
    from dropinf.report.options import ReportOptions
    from dropinf.score import ScoreOptions
    from dropinf.store.writer import StoreOptions
    for cmd, cls in (("featurize", StoreOptions), ("report", ReportOptions), ("score", ScoreOptions)):
        sub = build_parser()._subparsers._group_actions[0].choices[cmd]
        flags = {s for a in sub._actions for s in a.option_strings}
        for f in cli_fields(cls):
            assert ("-k" if f.name == "k" else "--" + f.name.replace("_", "-")) in flags, (cmd, f.name)
    args = build_parser().parse_args(["featurize", "m:f", "--store", "s", "--chunk-size", "7", "--dtype", "float16"])
    assert build(StoreOptions, args, path=args.store) == StoreOptions("s", chunk_size=7, dtype="float16")
    args = build_parser().parse_args(["report", "m:f", "--store", "s", "--suspicious", "none", "-k", "4"])
    assert build(ReportOptions, args) == ReportOptions(k=4, suspicious="none")
