"""`minillama lab`: the listing and the one-line error for an unknown experiment (each experiment's own
--quick run is tested in the file of the issue that added it)."""

from minillama.cli import main
from minillama.lab import EXPERIMENTS


def test_lab_lists_every_experiment(capsys):
    assert main(["lab"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS)


def test_unknown_experiment_is_one_line(capsys):
    assert main(["lab", "no-such-experiment"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillama lab: error: unknown experiment") and len(err.strip().splitlines()) == 1
