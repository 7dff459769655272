"""The training CLI's --help (issue 12): every option explained, with its default, and defaults sized
for the default dataset rather than the published 100-epoch MiT-B3 recipe."""
import argparse

import pytest

from gemini_seg import train


def options():
    return [a for a in train.build_parser()._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("dest", [a.dest for a in options()])
def test_every_option_has_help_text(dest):
    (action,) = [a for a in options() if a.dest == dest]
    assert action.help and action.help is not argparse.SUPPRESS and action.help.strip(), \
        f"{action.option_strings[0]} has no help text"


def test_help_prints_every_default_and_says_what_the_defaults_are_for(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert text.count("(default:") == len(options())
    assert "sized for the default dataset" in text and "--backbone mit_b3" in text


def test_the_default_run_is_a_small_model_for_a_few_epochs_of_the_synthetic_set(tmp_path):
    args = train.parse_args(["--out-dir", str(tmp_path / "run")])
    assert args.dataset == "synthetic" and args.backbone == "mit_b0"
    steps = args.epochs * args.synthetic_train // args.batch_size
    assert args.epochs <= 5 and steps <= 2000, steps
    assert args.warmup_iters < steps // 4  # the warm-up is not most of the run (it was 1500 of 25600)
