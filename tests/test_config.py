"""Property tests of option parsing: bad input is a UsageError with a clear message, never a crash.

The command line turns a UsageError into one message and exit status 2
(tests/test_reliability.py runs that under mpirun); here hypothesis feeds
``config.parse_args`` generated bad arguments, and bad arguments together with
bad arrays, and checks that nothing but a UsageError ever comes out.
"""

import math
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mlpcore.config import (LAUNCHERS, MAX_BATCH, MAX_EPOCHS, MAX_LR, MAX_SEED, MAX_UNITS, OVERLAPS, STRATEGIES,
                            TRAINERS, VOTES, build_parser, parse_args)
from mlpcore.data import shard_bounds, validate_arrays
from mlpcore.errors import UsageError

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
    "--stall-timeout": st.one_of(floats(max_value=0.0), non_finite, not_a_float),
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
    "--dtype": bad_choice(("float32", "float64")),
    "--source": bad_choice(("auto", "keras")),
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
    "--stall-timeout": st.floats(1e-3, 1e6),
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
