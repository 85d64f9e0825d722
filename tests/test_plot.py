"""recipe.plot: one PNG for one or several runs' metrics.jsonl, and one-line errors for bad input."""

import json

import pytest

from recipe import plot


def write_run(directory, speed: float, steps: int = 30):
    """A run's metrics.jsonl as the trainer writes it: training records every step, validation every 10."""
    directory.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append(
            {
                "step": step,
                "loss": 3.5 - step * 0.02,
                "lr": 1e-3,
                "tokens_per_second_per_gpu": 1000 * speed,
                "mfu": None,
                "train_seconds": step / speed,
            }
        )
        if step % 10 == 0:
            lines.append({"step": step, "train_seconds": step / speed, "val_loss": 3.4 - step * 0.015, "val_tokens": 100})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return directory


def png_size(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape


def test_one_run_default_output(tmp_path, capsys):
    run = write_run(tmp_path / "torch", speed=2.0)
    assert plot.main([str(run)]) == 0
    out = run / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert png_size(out)[0] > 500
    assert capsys.readouterr().out.strip() == f"wrote {out}"


def test_two_runs_on_one_figure(tmp_path):
    a, b = write_run(tmp_path / "a" / "run", speed=2.0), write_run(tmp_path / "b" / "run", speed=1.0, steps=20)
    assert plot.labels_for([a, b]) == ["a/run", "b/run"]  # same directory names: told apart by their parents
    plot.main([str(a), "-o", str(tmp_path / "one.png")])
    assert plot.main([str(a), str(b), "-o", str(tmp_path / "two.png")]) == 0
    one, two = (tmp_path / "one.png").read_bytes(), (tmp_path / "two.png").read_bytes()
    assert len(two) > 10_000 and two != one
    runs = [plot.read_run(d, d.name) for d in (a, b)]
    assert [len(r.train) for r in runs] == [30, 20] and [len(r.val) for r in runs] == [3, 2]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no directory", "no such output directory"),
        ("no metrics", "metrics.jsonl: no such file"),
        ("not json", "metrics.jsonl:2: not a JSON line"),
        ("no records", "no training or validation records"),
    ],
)
def test_bad_input(tmp_path, capsys, case, expected):
    run = tmp_path / "run"
    if case != "no directory":
        run.mkdir()
    if case == "not json":
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\nnot json\n')
    elif case == "no records":
        (run / "metrics.jsonl").write_text("")
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("recipe.plot: error:") and expected in err, err
