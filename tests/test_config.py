"""Property tests of the configuration: bad input is a UsageError with a clear message, never a crash.

The command line turns a UsageError into one message and exit status 2
(tests/test_reliability.py runs that under mpirun); here hypothesis feeds
``mlpcore.cli.parse_args`` generated bad arguments, and bad arguments together
with bad arrays, and checks that nothing but a UsageError ever comes out. The
Python API gets the same treatment: :class:`mlpcore.config.RunConfig` built
from bad Python values (wrong types, out-of-range numbers, unknown choices,
bools for ints) raises a UsageError naming the option, and a config parsed
from argv equals the one built from the same typed values.
"""

import dataclasses
import math
import string
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import MPI_TRAIN, PYTHON, REPO, cli_env, run_command
from mlpcore.cli import build_parser, parse_args
from mlpcore.config import (DTYPES, LAUNCHERS, MAX_BATCH, MAX_EPOCHS, MAX_LR, MAX_SEED, MAX_UNITS, OVERLAPS,
                            SOURCES, STRATEGIES, TRAINERS, VOTES, RunConfig)
from mlpcore.data import shard_bounds, validate_arrays
from mlpcore.errors import UsageError
from mlpcore.nn.kernels import KERNELS
from mlpcore.nn.model import MODELS

OPTIONS = sorted(s for a in build_parser()._actions for s in a.option_strings if s.startswith("--"))

text = st.text(alphabet=string.printable, max_size=12)
not_an_int = text.filter(lambda s: not s.strip().lstrip("+-").isdigit())
not_a_float = text.filter(lambda s: not _is_float(s))


def _is_float(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def bad_choice(choices):
    return text.filter(lambda s: s not in choices)


def floats(**kw):
    return st.floats(allow_nan=False, allow_infinity=False, **kw).map(repr)


non_finite = st.sampled_from(["nan", "inf", "-inf"])

# option -> values it must refuse
BAD_VALUES = {
    "--epochs": st.one_of(st.integers(max_value=0), st.integers(MAX_EPOCHS + 1, 10**30), not_an_int),
    "--batch-size": st.one_of(st.integers(max_value=0), st.integers(MAX_BATCH + 1, 10**30), not_an_int),
    "--jobs": st.one_of(st.integers(max_value=0), not_an_int),
    "--threads": st.one_of(st.integers(max_value=0), not_an_int),
    "--train-limit": st.one_of(st.integers(max_value=0), not_an_int),
    "--test-limit": st.one_of(st.integers(max_value=0), not_an_int),
    "--hidden": st.one_of(
        st.lists(st.integers(1, MAX_UNITS), max_size=3).flatmap(
            lambda good: st.tuples(st.just(good), st.one_of(st.integers(max_value=0),
                                                            st.integers(MAX_UNITS + 1, 10**12)))
        ).map(lambda t: ",".join(map(str, [*t[0], t[1]]))),
        text.filter(lambda s: not all(p.strip().lstrip("+").isdigit() for p in s.split(","))),
    ),
    "--lr": st.one_of(floats(max_value=0.0), floats(min_value=MAX_LR * 1.0001), non_finite, not_a_float),
    "--alpha": st.one_of(floats(max_value=-1e-300), st.sampled_from(["nan", "inf"]), not_a_float),
    "--stall-timeout": st.one_of(floats(max_value=-1e-300), non_finite, not_a_float),
    "--seed": st.one_of(st.integers(max_value=-1), st.integers(MAX_SEED + 1, 10**30), not_an_int),
    "--sync-every": st.one_of(st.integers(max_value=-1), not_an_int),
    "--bucket-kb": st.one_of(st.integers(max_value=-1), not_an_int),
    "--checkpoint-every": st.one_of(st.integers(max_value=-1), not_an_int),
    "--baseline-threads": st.one_of(st.integers(max_value=0), text.filter(
        lambda s: not all(p.strip() == "all" or p.strip().isdigit() and int(p) >= 1 for p in s.split(",")))),
    "--strategy": bad_choice(STRATEGIES),
    "--launcher": bad_choice(LAUNCHERS),
    "--trainer": bad_choice(TRAINERS),
    "--vote": bad_choice(VOTES),
    "--overlap": bad_choice(OVERLAPS),
    "--dtype": bad_choice(DTYPES),
    "--source": bad_choice(SOURCES),
    "--kernels": bad_choice(KERNELS),
    "--model": bad_choice(MODELS),
}

# option -> values it must accept (for the valid part of an argument list)
GOOD_VALUES = {
    "--epochs": st.integers(1, MAX_EPOCHS),
    "--batch-size": st.integers(1, MAX_BATCH),
    "--jobs": st.integers(1, 8),
    "--hidden": st.lists(st.integers(1, MAX_UNITS), min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))),
    "--lr": st.floats(1e-9, MAX_LR),
    "--alpha": st.floats(0, 1e6),
    "--seed": st.integers(0, MAX_SEED),
    "--stall-timeout": st.floats(0.0, 1e6),
    "--vote": st.sampled_from(VOTES),
    "--sync-every": st.integers(0, 1000),
}


@st.composite
def good_args(draw):
    chosen = draw(st.lists(st.sampled_from(sorted(GOOD_VALUES)), unique=True, max_size=4))
    return [f"{opt}={draw(GOOD_VALUES[opt])}" for opt in chosen]


@st.composite
def one_bad_option(draw):
    """(argument list with one bad option somewhere, that option)."""
    opt = draw(st.sampled_from(sorted(BAD_VALUES)))
    value = draw(BAD_VALUES[opt])
    args = draw(good_args())
    assume(not any(a.startswith(opt + "=") for a in args))
    args.insert(draw(st.integers(0, len(args))), f"{opt}={value}")
    return args, opt


def assert_usage_error(argv, mentions=None):
    with pytest.raises(UsageError) as info:
        parse_args(argv)
    message = str(info.value)
    assert message.strip(), "an empty message"
    if mentions:
        assert mentions in message, message
    return message


@settings(max_examples=300, deadline=None)
@given(one_bad_option())
def test_property_a_bad_option_is_a_usage_error_naming_it(case):
    argv, opt = case
    assert_usage_error(argv, mentions=opt)


@settings(max_examples=200, deadline=None)
@given(good_args())
def test_property_good_options_parse(argv):
    args = parse_args(argv)
    assert args.epochs >= 1 and args.batch_size >= 1 and args.lr > 0 and 0 <= args.seed <= MAX_SEED


def _not_help(token):
    return not (token.startswith("-h") or token.startswith("--h"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.lists(st.one_of(
    st.sampled_from(OPTIONS).filter(_not_help),
    st.sampled_from(OPTIONS).filter(_not_help).flatmap(lambda o: text.map(lambda v: f"{o}={v}")),
    text.filter(_not_help),
    st.text(alphabet="-" + string.ascii_lowercase, min_size=1, max_size=14).filter(_not_help),
), max_size=8))
def test_property_any_argument_list_parses_or_is_a_usage_error(argv):
    """Nothing but a UsageError ever escapes, whatever the argument list (--help aside)."""
    try:
        args = parse_args(argv)
    except UsageError as exc:
        assert str(exc).strip()
        return
    assert args.epochs >= 1 and args.lr > 0 and math.isfinite(args.alpha)  # what it accepted is usable


def test_unknown_and_ambiguous_options():
    assert_usage_error(["--no-such-option"], mentions="--no-such-option")
    assert_usage_error(["--b", "3"])        # ambiguous: --batch-size, --bucket-kb, --baseline-threads
    assert_usage_error(["--epochs"], mentions="--epochs")  # value missing


def test_resume_and_checkpoint_rules(tmp_path):
    args = parse_args(["--resume", str(tmp_path)])
    assert args.out == str(tmp_path)  # --resume continues in its own folder
    assert_usage_error(["--resume", str(tmp_path), "--out", str(tmp_path / "other")], mentions="--resume")
    assert_usage_error(["--checkpoint-every", "2", "--compare"], mentions="--checkpoint-every")
    assert_usage_error(["--checkpoint-every", "2", "--trainer", "sklearn"], mentions="--checkpoint-every")


# -- the combined check: options and data together ---------------------------------------------------
@st.composite
def arrays(draw, bad):
    """Small keras-layout arrays; ``bad`` picks one problem to put in them (None: valid)."""
    n_train = draw(st.integers(8, 12))  # >= every --jobs good_args() draws
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n_train, dtype=np.uint8)
    x_test = rng.integers(0, 256, (3, 784), dtype=np.uint8)
    y_test = rng.integers(0, 10, 3, dtype=np.int64)
    if bad == "label":
        y = y.astype(np.int64)
        y[draw(st.integers(0, n_train - 1))] = draw(st.one_of(st.integers(-(2**62), -1), st.integers(10, 2**62)))
    elif bad == "nan":
        x = x.astype(np.float32)
        x[0, 0, draw(st.integers(0, 27))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif bad == "shape":
        x = x[:, :, : draw(st.integers(0, 27))]
    elif bad == "count":
        y = y[: draw(st.integers(0, n_train - 1))]
    elif bad == "pixel":
        x = x.astype(np.int32)
        x[-1, -1, -1] = draw(st.one_of(st.integers(-(2**31), -1), st.integers(256, 2**31 - 1)))
    return x, y, x_test, y_test


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_property_options_and_data_together(data):
    """Good or bad options x good or bad arrays: a run's first steps (parse, check the arrays, split them
    over the workers) raise a UsageError whenever anything is bad, and nothing when all is well."""
    bad_args = data.draw(st.booleans(), label="bad args")
    bad_data = data.draw(st.sampled_from([None, "label", "nan", "shape", "count", "pixel", "too-few"]))
    argv = data.draw(one_bad_option())[0] if bad_args else data.draw(good_args())
    x, y, x_test, y_test = data.draw(arrays(None if bad_data == "too-few" else bad_data))
    if bad_data == "too-few":
        argv = [a for a in argv if not a.startswith("--jobs=")] + [f"--jobs={len(x) + data.draw(st.integers(1, 5))}"]

    def first_steps():
        args = parse_args(argv)
        arrays_ok = validate_arrays(x, y, x_test, y_test, "generated.npz")
        return shard_bounds(len(arrays_ok[0]), args.jobs)

    if bad_args or bad_data:
        with pytest.raises(UsageError) as info:
            first_steps()
        assert str(info.value).strip()
    else:
        bounds = first_steps()
        assert bounds[-1] == len(x)


# -- RunConfig: the same checks for the Python API ----------------------------------------------------
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
FLAGS = sorted(name for name, f in FIELDS.items() if f.default is False)  # the store_true options


def option(name):
    return "--" + name.replace("_", "-")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Python values of every kind: what a caller of the API might pass by mistake.
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), text, st.binary(max_size=4),
    st.complex_numbers(max_magnitude=1e6, allow_nan=False), st.lists(st.integers(-3, 3), max_size=3),
    st.tuples(), st.tuples(text), st.dictionaries(text, st.integers(), max_size=2),
)
not_an_int_value = junk.filter(lambda v: isinstance(v, bool) or not isinstance(v, int))  # bools for ints too
not_a_number = junk.filter(lambda v: not isinstance(v, (int, float)))


def py_bad_choice(choices, allow_none=False):
    return junk.filter(lambda v: v not in choices and not (allow_none and v is None))


def py_bad_int(low, high=None, allow_none=False):
    parts = [st.integers(max_value=low - 1), not_an_int_value.filter(lambda v: not (allow_none and v is None))]
    if high is not None:
        parts.append(st.integers(min_value=high + 1))
    return st.one_of(*parts)


def bad_tuple(bad_item, good_items):
    """Not a tuple (a list, a number, text ...), the empty tuple, or a tuple with one bad item among good ones."""
    return st.one_of(
        junk.filter(lambda v: not isinstance(v, tuple)).filter(lambda v: v != ()),
        st.just(()),
        st.tuples(st.lists(good_items, max_size=2), bad_item, st.lists(good_items, max_size=2)).map(
            lambda t: (*t[0], t[1], *t[2])),
    )


big_float = st.floats(min_value=MAX_LR, exclude_min=True)  # inf included
# field -> Python values RunConfig must refuse with a UsageError naming the option.
BAD_PY = {
    **{name: py_bad_choice(choices) for name, choices in (
        ("strategy", STRATEGIES), ("launcher", LAUNCHERS), ("trainer", TRAINERS), ("vote", VOTES),
        ("overlap", OVERLAPS), ("kernels", KERNELS), ("source", SOURCES), ("model", MODELS))},
    "dtype": py_bad_choice(DTYPES, allow_none=True),
    "jobs": py_bad_int(1),
    "epochs": py_bad_int(1, MAX_EPOCHS),
    "batch_size": py_bad_int(1, MAX_BATCH),
    "bucket_kb": py_bad_int(0),
    "sync_every": py_bad_int(0),
    "checkpoint_every": py_bad_int(0),
    "threads": py_bad_int(1, allow_none=True),
    "train_limit": py_bad_int(1, allow_none=True),
    "test_limit": py_bad_int(1, allow_none=True),
    "seed": py_bad_int(0, MAX_SEED),
    "hidden": bad_tuple(st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_UNITS + 1), not_an_int_value),
                        st.integers(1, MAX_UNITS)),
    "baseline_threads": bad_tuple(st.one_of(st.integers(max_value=0), not_an_int_value.filter(lambda v: v != "all")),
                                  st.one_of(st.integers(1, 64), st.just("all"))),
    "lr": st.one_of(st.floats(max_value=0.0), big_float, st.just(math.nan), st.integers(max_value=0),
                    st.integers(min_value=int(MAX_LR) + 1), not_a_number, st.booleans()),
    "alpha": st.one_of(st.floats(max_value=-1e-300), st.sampled_from([math.nan, math.inf]),
                       st.integers(max_value=-1), not_a_number, st.booleans()),
    "stall_timeout": st.one_of(st.floats(max_value=-1e-300), st.sampled_from([math.nan, math.inf]),
                               st.integers(max_value=-1), st.booleans(),
                               not_a_number),
}

path_text = st.text(alphabet=string.ascii_letters + string.digits + "/._-", min_size=1, max_size=12)
# field -> valid Python values of its own (combinations may still break a cross-field rule)
GOOD_PY = {
    "strategy": st.sampled_from(STRATEGIES), "launcher": st.sampled_from(LAUNCHERS), "jobs": st.integers(1, 64),
    "trainer": st.sampled_from(TRAINERS), "compare": st.booleans(),
    "hidden": st.lists(st.integers(1, MAX_UNITS), min_size=1, max_size=4).map(tuple),
    "epochs": st.integers(1, MAX_EPOCHS), "batch_size": st.integers(1, MAX_BATCH),
    "lr": st.floats(min_value=0.0, max_value=MAX_LR, exclude_min=True), "alpha": st.floats(0.0, 1e300),
    "dtype": st.one_of(st.none(), st.sampled_from(DTYPES)), "seed": st.integers(0, MAX_SEED),
    "kernels": st.sampled_from(KERNELS), "model": st.sampled_from(MODELS), "vote": st.sampled_from(VOTES), "overlap": st.sampled_from(OVERLAPS),
    "bucket_kb": st.integers(0, 10**6), "sync_every": st.integers(0, 10**4),
    "shard_optimizer": st.booleans(), "node_shm": st.booleans(),
    "threads": st.one_of(st.none(), st.integers(1, 64)),
    "baseline_threads": st.lists(st.one_of(st.integers(1, 64), st.just("all")), min_size=1, max_size=3).map(tuple),
    "no_baseline": st.booleans(), "data": st.one_of(st.none(), path_text), "source": st.sampled_from(SOURCES),
    "download": st.booleans(), "mirror": st.one_of(st.none(), path_text.map(lambda p: "https://example.org/" + p)),
    "train_limit": st.one_of(st.none(), st.integers(1, 10**6)), "test_limit": st.one_of(st.none(), st.integers(1, 10**6)),
    "out": st.one_of(st.none(), path_text), "overwrite": st.booleans(), "no_plots": st.booleans(),
    "show": st.booleans(), "quiet": st.booleans(),
    "stall_timeout": st.floats(min_value=0.0, max_value=1e9),
    "checkpoint_every": st.integers(0, 100), "resume": st.one_of(st.none(), path_text),
}


def test_the_tables_cover_every_field():
    assert set(GOOD_PY) == set(FIELDS)
    unchecked = set(FIELDS) - set(BAD_PY)  # flags and paths: WRONG_TYPES and the any-value property cover them
    assert unchecked == {*FLAGS, "data", "mirror", "out", "resume"}, unchecked


@st.composite
def good_kwargs(draw, exclude=(), max_size=8):
    names = draw(st.lists(st.sampled_from(sorted(set(GOOD_PY) - set(exclude))), unique=True, max_size=max_size))
    return {name: draw(GOOD_PY[name]) for name in names}


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_property_a_bad_python_value_is_a_usage_error_naming_it(data):
    """Wrong types, out-of-range numbers, unknown choices, bools for ints: a UsageError naming the option.

    Only a UsageError: any other exception (a TypeError from comparing a str with a number, ...)
    escapes pytest.raises and fails the test.
    """
    name = data.draw(st.sampled_from(sorted(BAD_PY)), label="field")
    value = data.draw(BAD_PY[name], label="value")
    others = data.draw(good_kwargs(exclude=[name]), label="other options")
    with pytest.raises(UsageError) as info:
        RunConfig(**others, **{name: value})
    assert option(name) in str(info.value), str(info.value)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_property_any_python_value_builds_or_is_a_usage_error(data):
    """Any value for any field (the flags and paths too), among valid others: a config, or a UsageError."""
    name = data.draw(st.sampled_from(sorted(FIELDS)), label="field")
    value = data.draw(junk, label="value")
    others = data.draw(good_kwargs(exclude=[name]), label="other options")
    try:
        config = RunConfig(**others, **{name: value})
    except UsageError as exc:
        assert str(exc).strip()
        return
    assert config.epochs >= 1 and config.lr > 0 and config.dtype in DTYPES  # what it accepted is usable


# Types a property test draws rarely, spelled out: each must be a UsageError.
WRONG_TYPES = {
    # crashes with a TypeError instead of a UsageError
    "stall-timeout-str": {"stall_timeout": "3"},
    "stall-timeout-list": {"stall_timeout": [1]},
    "stall-timeout-complex": {"stall_timeout": 1j},
    "out-not-a-path-with-resume": {"resume": "a", "out": 5},
    "resume-bytes-with-out": {"resume": b"a", "out": "a"},
    # accepted: a bool for a number
    "lr-bool": {"lr": True},
    "alpha-bool": {"alpha": True},
    "stall-timeout-bool": {"stall_timeout": True},
    # accepted: flags and paths of the wrong type
    "quiet-str": {"quiet": "no"},
    "compare-int": {"compare": 1},
    "out-int": {"out": 5},
    "data-int": {"data": 3},
}


@pytest.mark.parametrize("case", list(WRONG_TYPES), ids=list(WRONG_TYPES))
def test_wrong_python_types_are_usage_errors(case):
    with pytest.raises(UsageError):
        RunConfig(**WRONG_TYPES[case])


def to_argv(kwargs):
    """The command line that means ``kwargs`` (typed values, as RunConfig takes them)."""
    argv = []
    for name, value in kwargs.items():
        opt = option(name)
        if name in FLAGS:
            argv += [opt] if value else []
        elif value is None:
            continue  # the default
        elif isinstance(value, tuple):
            argv.append(f"{opt}={','.join(map(str, value))}")
        else:
            argv.append(f"{opt}={value!r}" if isinstance(value, float) else f"{opt}={value}")
    return argv


@settings(max_examples=400, deadline=None)
@given(good_kwargs(max_size=12))
def test_property_parse_args_equals_runconfig_of_the_same_values(kwargs):
    """parse_args(argv) is RunConfig(**the same values); a combination one refuses, the other refuses alike."""
    argv = to_argv(kwargs)
    try:
        expected = RunConfig(**kwargs)
    except UsageError as exc:  # a cross-field rule (--resume with --out, --trainer sklearn ...)
        with pytest.raises(UsageError) as info:
            parse_args(argv)
        assert str(info.value) == str(exc)
        return
    parsed = parse_args(argv)
    assert parsed == expected, argv
    assert parsed.as_dict() == expected.as_dict()


def test_defaults_and_derived_fields():
    assert parse_args([]) == RunConfig()
    assert RunConfig().dtype == "float32" and RunConfig(trainer="sklearn").dtype == "float64"
    assert RunConfig(resume="runs/x").out == "runs/x"
    config = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    assert config.replace(epochs=3).epochs == 3 and config.epochs == 10
    with pytest.raises(UsageError, match="--epochs"):
        config.replace(epochs=0)  # replace validates again
    assert list(config.as_dict()) == sorted(FIELDS)
    assert config.as_dict()["hidden"] == [128] and config.as_dict()["baseline_threads"] == [1]


def test_cross_field_rules_of_the_python_api(tmp_path):
    with pytest.raises(UsageError, match="--resume"):
        RunConfig(resume=str(tmp_path), out=str(tmp_path / "other"))
    assert RunConfig(resume=str(tmp_path), out=str(tmp_path)).out == str(tmp_path)
    for bad in ({"checkpoint_every": 2, "compare": True}, {"checkpoint_every": 2, "trainer": "sklearn"},
                {"resume": str(tmp_path), "compare": True}):
        with pytest.raises(UsageError, match="--checkpoint-every"):
            RunConfig(**bad)
    with pytest.raises(UsageError, match="--trainer sklearn"):
        RunConfig(trainer="sklearn", strategy="allreduce")


# -- the help text ---------------------------------------------------------------------------------
HELP_FILE = REPO / "tests" / "data" / "help.txt"


def test_help_text_is_unchanged():
    """``python mpi_train.py --help`` is byte for byte tests/data/help.txt.

    That file was generated from the commit before the wings refactor (4581e36; Python 3.11's
    argparse, ``COLUMNS=80``), so that moving the parser to mlpcore.cli could not change the
    command line's help unnoticed. A deliberate change to the help (a new option, a reworded
    line) updates the file: ``COLUMNS=80 python mpi_train.py --help > tests/data/help.txt``.
    (Another Python's argparse may lay the text out differently: regenerate it there too.)
    """
    import subprocess

    proc = subprocess.run([PYTHON, str(MPI_TRAIN), "--help"], cwd=REPO, env=cli_env({"COLUMNS": "80"}),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    expected = HELP_FILE.read_bytes()
    assert proc.stdout.decode(errors="replace") == expected.decode(), "see this test's docstring"
    assert proc.stdout == expected
