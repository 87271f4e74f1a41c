"""The strategy suite (runner benchmarks/experiments.py, records and report in
benchmarks/suite/) and the markdown helper every benchmark writes through: numbers come from the
runs' event files, the statistics are right, the findings say plainly who does not beat scratch,
the README keeps everything outside its markers, and a section rewrite touches nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmarks import experiments as ex
from benchmarks import markdown
from benchmarks.suite import records as rec
from benchmarks.suite import report as rep
from benchmarks.suite.spec import STRATEGIES


def fake_run(runs: Path, strategy: str, fraction: float, seed: int, acc: float, seconds: float = 60.0,
             images: float = 1000.0, finished: bool = True) -> None:
    path = runs / f"{strategy}-{fraction * 100:g}pct" / f"seed{seed}"
    w = SummaryWriter(str(path))
    w.add_scalar("budget/train_seconds", seconds, 10)
    w.add_scalar("budget/images_seen", images, 10)
    if finished:
        w.add_scalar("test/acc", acc, 10)
    w.close()


@pytest.fixture()
def suite(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "full_ft", 0.01, 0, 0.60)
    fake_run(runs, "full_ft", 0.01, 1, 0.62)
    fake_run(runs, "full_ft", 0.01, 2, 0.99, finished=False)  # crashed before testing: left out
    fake_run(runs, "linear_probe", 0.01, 0, 0.50)
    fake_run(runs, "scratch", 0.01, 0, 0.55)
    fake_run(runs, "scratch", 0.01, 1, 0.53)
    fake_run(runs, "full_ft", 1.0, 0, 0.905, seconds=700)
    fake_run(runs, "cpu_best", 1.0, 0, 0.91)  # an extra config, run at 100% only
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{rep.BEGIN}\nstale table\n{rep.END}\n\nafter\n")
    return runs, tmp_path / "docs", readme


def test_report_reads_runs_and_computes_statistics(suite):
    runs, docs, readme = suite
    rows = ex.write_results(STRATEGIES + ["cpu_best"], runs=runs, docs=docs, readme=readme)

    assert [r["acc"] for r in rows[("full_ft", 0.01)]] == pytest.approx([0.60, 0.62])  # unfinished run skipped
    assert rows[("full_ft", 0.01)][0]["wall"] >= 0
    table = rep.fraction_table(rows, STRATEGIES + ["cpu_best"], 0.01)
    # mean 61.0, sample sd of (60, 62) = 1.41; scratch mean 54.0
    assert "| full_ft | 61.0 ± 1.4 | 0, 1 | 60.0 / 62.0 | +7.0 pts |" in table
    assert "| linear_probe | 50.0 | 0 | 50.0 | -4.0 pts |" in table
    assert "| gradual | not run |" in table and "cpu_best" not in table  # extras only where run

    results = (docs / "results.md").read_text()
    assert table in results
    assert (docs / "results_accuracy_vs_time.png").stat().st_size > 10_000

    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith(f"{rep.END}\n\nafter\n")
    assert "stale table" not in text
    assert "| full_ft | 61.0 ± 1.4 (2) | 90.5 (1) |" in text
    assert "| cpu_best | - | 91.0 (1) |" in text and "| gradual | - | - |" in text
    assert "DenseNet-BC" in text  # the published figures sit beside ours


def test_findings_name_the_strategies_that_do_not_beat_scratch(suite):
    runs, docs, readme = suite
    rows = rec.collect(STRATEGIES, runs)
    facts = rep.findings(rows, STRATEGIES, [0.01, 1.0])
    assert any("not better than scratch (54.0%): linear_probe" in f for f in facts)
    target = [f for f in facts if f.startswith("Best at 100%")]
    assert len(target) == 1 and "full_ft, 90.5%" in target[0] and "is met" in target[0]  # cpu_best not asked for


def test_target_not_met_below_90_percent(tmp_path):
    fake_run(tmp_path, "full_ft", 1.0, 0, 0.899)
    facts = rep.findings(rec.collect(STRATEGIES, tmp_path), STRATEGIES, [1.0])
    assert "**not met**" in facts[0]


def test_every_strategy_beating_scratch_is_said_with_the_margins(tmp_path):
    fake_run(tmp_path, "full_ft", 0.1, 0, 0.80)
    fake_run(tmp_path, "gradual", 0.1, 0, 0.75)
    fake_run(tmp_path, "scratch", 0.1, 0, 0.70)
    facts = rep.findings(rec.collect(STRATEGIES, tmp_path), STRATEGIES, [0.1])
    assert facts == [
        "At 10% of the labels, best first: full_ft 80.0, gradual 75.0, scratch 70.0.",
        "At 10% of the labels every pretrained strategy run (2) beats scratch (70.0%), by 5.0 to 10.0 points.",
    ]


def test_readme_without_markers_is_left_alone(suite, capsys):
    runs, docs, readme = suite
    readme.write_text("# no markers here\n")
    ex.write_results(STRATEGIES, runs=runs, docs=docs, readme=readme)
    assert readme.read_text() == "# no markers here\n"
    assert "no <!-- experiments:begin -->" in capsys.readouterr().out


def test_unknown_strategy_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as err:
        ex.main(["--strategies", "full_ft", "fulll_ft", "--report-only"])
    assert err.value.code == 2
    assert "fulll_ft" in capsys.readouterr().err


def test_every_suite_strategy_has_a_config_and_the_shared_base_is_not_one(capsys):
    assert all((ex.CONFIGS / f"{s}.yaml").is_file() for s in STRATEGIES)
    assert set(STRATEGIES) <= set(ex.config_names()) and "_base" not in ex.config_names()
    with pytest.raises(SystemExit):
        ex.main(["--strategies", "_base", "--report-only"])
    assert "no configs/experiments/<name>.yaml for _base" in capsys.readouterr().err


def test_variant_rows_sit_under_their_strategy_with_overrides_and_stay_out_of_the_findings(suite):
    runs, docs, readme = suite
    fake_run(runs, "full_ft+timm_head", 0.01, 0, 0.40)  # worse than scratch, but only a variant
    (runs / "full_ft+timm_head-1pct" / "overrides.txt").write_text("model.head_init=timm\n")
    names = ["linear_probe", "full_ft", "full_ft+timm_head", "scratch", "cpu_best"]
    assert rec.variants(runs) == {"full_ft+timm_head": ["model.head_init=timm"]}
    rows = ex.write_results(names, runs=runs, docs=docs, readme=readme)

    table = rep.fraction_table(rows, names, 0.01)
    lines = table.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("| full_ft |"))
    assert lines[i + 1] == "| full_ft+timm_head | 40.0 | 0 | 40.0 | -14.0 pts | 0.0 | 1.0 | 1k |"
    results = (docs / "results.md").read_text()
    assert "- `full_ft+timm_head`: `full_ft` with `model.head_init=timm`." in results
    facts = rep.findings(rows, [n for n in names if not rec.is_variant(n)], [0.01])
    assert not any("timm_head" in f for f in facts)
    assert "not better than scratch (54.0%): linear_probe." in " ".join(facts)  # the variant (40%) is not named
    assert "timm_head" not in readme.read_text()  # headline: the suite only


def test_variant_launch_passes_overrides_after_the_suite_and_records_them(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ex, "RUNS", tmp_path)
    monkeypatch.setattr(ex, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(ex.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(ex, "write_results", lambda names: calls.append(names))
    ex.main(["--strategies", "full_ft", "--fractions", "0.1", "--tag", "timm_head", "--set", "model.head_init=timm"])
    cmd = calls[0]
    configs = [cmd[i + 1] for i, word in enumerate(cmd) if word == "--config"]
    # the shared recipe, then the strategy's changes: the last config names the run
    assert [Path(c).relative_to(ex.ROOT).as_posix() for c in configs] == [
        "configs/experiments/_base.yaml", "configs/experiments/full_ft.yaml"]
    assert cmd[-2:] == ["--model.head_init", "timm"] and cmd.index("--trainer.max_epochs") < len(cmd) - 2
    assert cmd[cmd.index("--trainer.logger.init_args.name") + 1] == "full_ft+timm_head-10pct"
    assert (tmp_path / "full_ft+timm_head-10pct" / "overrides.txt").read_text() == "model.head_init=timm\n"
    assert "full_ft+timm_head" in calls[1] and calls[1].index("full_ft+timm_head") == calls[1].index("full_ft") + 1
    # The same tag with other overrides would mix two variants under one name: refused.
    with pytest.raises(SystemExit, match="already has runs with model.head_init=timm"):
        ex.main(["--strategies", "full_ft", "--fractions", "0.1", "--tag", "timm_head", "--set", "model.head_init=normal"])


@pytest.mark.parametrize("argv, message", [
    (["--tag", "x"], "--tag and --set go together"),
    (["--set", "model.head_init=timm"], "--tag and --set go together"),
    (["--tag", "a/b", "--set", "model.head_init=timm"], "letters, digits and _"),
    (["--tag", "x", "--set", "model.head_init"], "write KEY=VALUE"),
])
def test_bad_variant_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        ex.main(["--strategies", "full_ft", *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_records_rebuild_the_same_report_on_a_fresh_clone(suite):
    """runs/ is not committed: the per-run lines in docs/results_runs.jsonl are enough to
    rebuild the tables, the README headline and the variant legend."""
    import shutil

    runs, docs, readme = suite
    fake_run(runs, "full_ft+timm_head", 0.01, 0, 0.40)
    (runs / "full_ft+timm_head-1pct" / "overrides.txt").write_text("model.head_init=timm\n")
    names = ["linear_probe", "full_ft", "full_ft+timm_head", "scratch", "cpu_best"]
    ex.write_results(names, runs=runs, docs=docs, readme=readme)
    records = (docs / rec.RECORDS_NAME).read_text().splitlines()
    assert len(records) == 8  # 9 fake runs, one never finished
    first = (docs / "results.md").read_text(), readme.read_text()

    shutil.rmtree(runs)
    rows = ex.write_results(names, runs=runs, docs=docs, readme=readme)
    assert ((docs / "results.md").read_text(), readme.read_text()) == first
    assert (docs / rec.RECORDS_NAME).read_text().splitlines() == records
    assert rows[("full_ft", 0.01)][1]["acc"] == pytest.approx(0.62)
    assert "- `full_ft+timm_head`: `full_ft` with `model.head_init=timm`." in first[0]


def test_a_run_on_disk_replaces_its_record_and_other_records_are_kept(suite):
    runs, docs, readme = suite
    ex.write_results(STRATEGIES, runs=runs, docs=docs, readme=readme)
    fake_run(runs, "full_ft", 0.01, 0, 0.70)  # re-run: a newer event file with another result
    ex.write_results(["full_ft"], runs=runs, docs=docs, readme=readme)  # a narrower report...
    by_key = {(r["strategy"], r["fraction"], r["seed"]): r for r in rec.load_records(docs / rec.RECORDS_NAME)}
    assert ("scratch", 0.01, "1") in by_key  # ...drops no one else's record
    assert ("full_ft", 0.01, "0") in by_key and by_key[("full_ft", 0.01, "0")]["acc"] == pytest.approx(0.70)


def test_a_broken_record_line_is_named(tmp_path):
    path = tmp_path / rec.RECORDS_NAME
    path.write_text('{"strategy": "full_ft", "fraction": 0.1, "seed": "0", "acc": 0.8}\nnot json\n')
    with pytest.raises(SystemExit, match=rf"{rec.RECORDS_NAME}:2: not a run record"):
        rec.load_records(path)


def test_a_recorded_run_is_not_run_again(suite, monkeypatch, capsys):
    runs, docs, readme = suite
    ex.write_results(STRATEGIES, runs=runs, docs=docs, readme=readme)
    calls = []
    monkeypatch.setattr(ex, "RUNS", tmp := runs.parent / "fresh_runs")
    monkeypatch.setattr(ex, "DOCS", docs)
    monkeypatch.setattr(ex.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(ex, "write_results", lambda names: None)
    ex.main(["--strategies", "full_ft", "scratch", "--fractions", "0.01", "--seeds", "1", "2"])
    launched = [c[c.index("--trainer.logger.init_args.name") + 1:][:3:2] for c in calls]
    assert launched == [["full_ft-1pct", "seed2"], ["scratch-1pct", "seed2"]]  # seed 1 of both is recorded
    assert "full_ft 0.01 seed 1: recorded in docs/" in capsys.readouterr().out
    assert not (tmp / "full_ft-1pct" / "seed1").exists()
    assert (tmp / "full_ft-1pct" / "seed2" / "machine.txt").read_text().endswith(" cores\n")  # launched runs say where


def test_runs_timed_on_different_machines_are_told_apart(suite):
    runs, docs, readme = suite
    (runs / "full_ft-1pct" / "seed0" / "machine.txt").write_text("AMD EPYC (AVX2), 2 cores\n")
    (runs / "full_ft-1pct" / "seed1" / "machine.txt").write_text("Intel Xeon (AVX-512), 2 cores\n")
    (runs / "scratch-1pct" / "seed0" / "machine.txt").write_text("AMD EPYC (AVX2), 2 cores\n")
    rows = ex.write_results(STRATEGIES, runs=runs, docs=docs, readme=readme)
    assert rows[("full_ft", 0.01)][0]["machine"] == "AMD EPYC (AVX2), 2 cores"
    results = (docs / "results.md").read_text()
    # 3 runs without a record of their machine come first (cpu_best is not reported here), then the EPYC's 2 and the Xeon's 1
    assert ("Timed on: A = not recorded (3 runs); B = AMD EPYC (AVX2), 2 cores (2 runs); "
            "C = Intel Xeon (AVX-512), 2 cores (1 run). Wall times are comparable only") in results
    assert "| full_ft | 61.0 ± 1.4 | 0, 1 | 60.0 / 62.0 | +7.0 pts | 0.0 | 1.0 | 1k | B/C |" in results
    assert "| gradual | not run | | | | | | | |" in results


def test_one_machine_needs_no_machine_column(tmp_path):
    fake_run(tmp_path / "runs", "full_ft", 0.1, 0, 0.8)
    (tmp_path / "runs" / "full_ft-10pct" / "seed0" / "machine.txt").write_text("AMD EPYC (AVX2), 2 cores\n")
    ex.write_results(["full_ft"], runs=tmp_path / "runs", docs=tmp_path / "docs", readme=tmp_path / "README.md")
    results = (tmp_path / "docs" / "results.md").read_text()
    assert "Timed on: AMD EPYC (AVX2), 2 cores (1 run)." in results and "| machine |" not in results


@pytest.mark.slow
@pytest.mark.parametrize("how", [["benchmarks/experiments.py"], ["-m", "benchmarks.experiments"]], ids=["script", "module"])
def test_the_runner_starts_as_a_script_and_as_a_module(how):
    """`python benchmarks/experiments.py ...` (as the README runs it) and `python -m
    benchmarks.experiments`: the imports of the split modules must resolve both ways."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, *how, "--help"], cwd=ex.ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--report-only" in out.stdout


def test_an_unfinished_run_is_cleared_before_it_is_run_again(tmp_path, monkeypatch, capsys):
    """A killed run leaves event files; launched again into the same directory, the old first
    event would become the new run's start and inflate its wall time."""
    monkeypatch.setattr(ex, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(ex, "DOCS", tmp_path / "docs")
    fake_run(tmp_path / "runs", "full_ft", 0.1, 0, 0.0, finished=False)
    stale = list((tmp_path / "runs" / "full_ft-10pct" / "seed0").iterdir())
    launched = []

    def run(cmd, **kw):  # what the subprocess finds when it starts
        launched.append(sorted(p.name for p in (tmp_path / "runs" / "full_ft-10pct" / "seed0").iterdir()))

    monkeypatch.setattr(ex.subprocess, "run", run)
    monkeypatch.setattr(ex, "write_results", lambda names: None)
    ex.main(["--strategies", "full_ft", "--fractions", "0.1"])
    assert stale and launched == [["machine.txt"]]
    assert "removed the unfinished run" in capsys.readouterr().out


# The markdown helper every benchmark script writes through.

DOC = "# results\n\nintro\n\n## One\n\nold one\n\n## Two\n\nold two\n\n### a sub-heading of two\n\nmore\n\n## Three\n\nthree\n"


def test_a_section_is_replaced_in_place_and_nothing_else_changes(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(DOC)
    section = markdown.write_section(path, "Two", "new two\n\n| a | b |\n")
    assert section == "## Two\n\nnew two\n\n| a | b |\n"
    assert path.read_text() == DOC.replace("old two\n\n### a sub-heading of two\n\nmore\n", "new two\n\n| a | b |\n")
    once = path.read_bytes()
    markdown.write_section(path, "Two", "new two\n\n| a | b |\n")
    assert path.read_bytes() == once  # rewriting the same text gives the same bytes
    markdown.write_section(path, "Three", "last")  # the last section: the file still ends in one newline
    assert path.read_text().endswith("## Three\n\nlast\n") and path.read_text().startswith("# results\n\nintro\n\n## One\n\nold one\n\n## Two")


def test_a_missing_section_is_appended_and_a_missing_file_created(tmp_path):
    path = tmp_path / "results.md"
    path.write_text(DOC)
    markdown.write_section(path, "Four", "four")
    assert path.read_text() == DOC + "\n## Four\n\nfour\n"
    new = tmp_path / "sub" / "BENCH.md"
    markdown.write_section(new, "Speed", "fast", heading="# lit-ft benchmarks")
    assert new.read_text() == f"# lit-ft benchmarks\n\n{markdown.NEW_FILE_NOTE}\n\n## Speed\n\nfast\n"


def test_a_section_body_is_written_literally(tmp_path):
    """Backslashes and group references are text, not regex replacement escapes."""
    path = tmp_path / "results.md"
    path.write_text(DOC)
    body = r"C:\path\new \1 \g<0> $1"
    markdown.write_section(path, "One", body)
    assert f"## One\n\n{body}\n\n## Two" in path.read_text()


def test_the_block_between_markers_is_replaced_only_when_both_markers_are_there(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("top\n<!-- b -->\nold\n<!-- e -->\nbottom\n")
    assert markdown.write_between(path, "<!-- b -->", "<!-- e -->", "new\n")
    assert path.read_text() == "top\n<!-- b -->\nnew\n<!-- e -->\nbottom\n"
    path.write_text("no markers\n")
    assert not markdown.write_between(path, "<!-- b -->", "<!-- e -->", "new\n")
    assert path.read_text() == "no markers\n"
    assert not markdown.write_between(tmp_path / "absent.md", "<!-- b -->", "<!-- e -->", "new\n")
    assert not (tmp_path / "absent.md").exists()


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    path.write_text(DOC)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(markdown.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        markdown.write_section(path, "Two", "new two")
    assert path.read_text() == DOC
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]
