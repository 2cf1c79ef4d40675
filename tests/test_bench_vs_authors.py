"""bench/bench_vs_authors.py: a clear failure naming the path when the authors' checkout is absent, and
the report's verdicts (no benchmark is run here)."""
from __future__ import annotations

from bench import bench_vs_authors as b


def test_absent_checkout_fails_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-checkout"
    assert b.main(["--authors", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "JaminFong/DenseNAS" in err
    assert not (tmp_path / "out.md").exists()


def test_checkout_without_their_files_fails_naming_the_path(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert b.main(["--authors", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "models/dropped_model.py" in err


def _row(kind, size, batch, ours, theirs, rss_ours, rss_theirs):
    side = lambda t, rss: {"min_s": min(t), "median_s": sorted(t)[len(t) // 2], "weights": 90_430_100,  # noqa: E731
                           "arch_scalars": 633, "peak_rss_gib": rss}
    r = {"kind": kind, "size": size, "batch": batch, "ours": side(ours, rss_ours), "theirs": side(theirs, rss_theirs),
         "speedup_median": side(theirs, 0)["median_s"] / side(ours, 0)["median_s"], "speedup_paired_median": 1.0,
         "interleaved_process_peak_rss_gib": rss_ours + rss_theirs, "load_during_timing": [1.0, 1.0], "rss_steps": 3}
    r["faster"] = r["speedup_median"] >= b.GOAL_SPEEDUP
    r["lower_rss"] = rss_ours < rss_theirs
    return r


def test_report_verdicts():
    result = {"machine": {"cpu": "cpu", "cores": 2, "memory_gib": 8, "torch": "2", "python": "3"}, "threads": 2,
              "load_before": [1, 1, 1], "load_after": [1, 1, 1], "date": "today", "elapsed_s": 60, "command": "python x",
              "authors": {"commit": "abc", "source": "/src", "tree": "/src", "exported": False}, "warmup": 2, "steps": 3,
              "rows_are_goal_rows": True,
              "rows": [_row("weight", 224, 8, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], 3.0, 3.3),
                       _row("arch", 224, 8, [1.0, 1.0, 1.0], [1.2, 1.2, 1.2], 5.5, 5.1)]}
    text = b.report(result)
    assert "**2.00x**" in text and "**1.20x**" in text
    assert "missed** on 1 of 2 (arch 224x224 b8)" in text
    assert text.count("missed") == 2  # speed and RSS, both on the arch row
