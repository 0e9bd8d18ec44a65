"""Progress output: a rich bar on a terminal, plain periodic lines in a file or pipe."""

import io
import re

import pytest

from pytei.progress import DEFAULT_INTERVAL, LineProgress, ProgressSettingError, progress_bar


class Clock:
    """A fake monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_most_every_interval_and_once_at_the_end():
    clock, out = Clock(), io.StringIO()
    with progress_bar(plain=True, interval=10, file=out, get_time=clock) as bar:
        assert isinstance(bar, LineProgress)
        task = bar.add_task("campaign quick", total=100)
        for _ in range(100):
            clock.now += 0.5  # 2 trials/s
            bar.advance(task)
            if _ == 19:
                assert out.getvalue() == "campaign quick: 20/100 (20.0%), 2/s, elapsed 0:00:10, ETA 0:00:40\n"
    lines = out.getvalue().splitlines()
    # one line per 10 s over 50 s (at 10, 20, 30, 40 s; the task is complete at 50 s) + the final line
    assert len(lines) == 5, lines
    assert [re.search(r"(\d+)/100", line).group(1) for line in lines] == ["20", "40", "60", "80", "100"]
    assert lines[-1] == "campaign quick: 100/100 (100.0%), 2/s, elapsed 0:00:50, ETA 0:00:00"


def test_nothing_is_written_before_the_interval():
    clock, out = Clock(), io.StringIO()
    with progress_bar(plain=True, interval=30, file=out, get_time=clock) as bar:
        task = bar.add_task("work", total=10)
        for _ in range(5):
            clock.now += 5
            bar.advance(task)
        assert out.getvalue() == ""
    # stopped before the task finished (an interruption): the last state is still written
    assert out.getvalue() == "work: 5/10 (50.0%), 0.2/s, elapsed 0:00:25, ETA 0:00:25\n"


def test_a_resumed_task_rates_only_this_sessions_work():
    clock, out = Clock(), io.StringIO()
    with progress_bar(plain=True, interval=1, file=out, get_time=clock) as bar:
        task = bar.add_task("campaign c", total=1000, completed=900)
        clock.now += 4
        bar.advance(task, 20)
    assert out.getvalue().splitlines()[0] == "campaign c: 920/1000 (92.0%), 5/s, elapsed 0:00:04, ETA 0:00:16"


def test_the_final_line_shows_a_description_set_after_the_last_step():
    """Training sets 'epoch N: loss .. valid AUC ..' once an epoch's batches are done."""
    clock, out = Clock(), io.StringIO()
    with progress_bar(plain=True, interval=60, file=out, get_time=clock) as bar:
        for epoch in range(2):
            task = bar.add_task(f"epoch {epoch}", total=4)
            for _ in range(4):
                clock.now += 1
                bar.advance(task)
            bar.update(task, description=f"epoch {epoch}: valid AUC 0.7{epoch}")
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in lines] == [
        "epoch 0: valid AUC 0.70",
        "epoch 1: valid AUC 0.71",
    ]
    assert all("4/4 (100.0%)" in line for line in lines)


def test_a_task_without_total_counts_without_eta():
    clock, out = Clock(), io.StringIO()
    with progress_bar(plain=True, interval=1, file=out, get_time=clock) as bar:
        task = bar.add_task("scan", total=None)
        clock.now += 2
        bar.advance(task, 3)
    assert out.getvalue().splitlines()[0] == "scan: 3 done, 1.5/s, elapsed 0:00:02, ETA -:--:--"


def test_non_terminal_stdout_gets_lines_and_the_interval_comes_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("PYTEI_PROGRESS_INTERVAL", "0.25")
    clock = Clock()
    with progress_bar(get_time=clock) as bar:  # under pytest, stdout is not a terminal
        assert isinstance(bar, LineProgress) and bar.interval == 0.25
        task = bar.add_task("x", total=2)
        clock.now += 0.25
        bar.advance(task)
        assert capsys.readouterr().out == "x: 1/2 (50.0%), 4/s, elapsed 0:00:00, ETA 0:00:00\n"
    monkeypatch.delenv("PYTEI_PROGRESS_INTERVAL")
    with progress_bar() as bar:
        assert bar.interval == DEFAULT_INTERVAL


def test_a_terminal_or_a_disabled_bar_keeps_the_rich_bar(capsys):
    with progress_bar(plain=False) as bar:
        assert not isinstance(bar, LineProgress)
    capsys.readouterr()
    with progress_bar(enabled=False) as bar:
        assert not isinstance(bar, LineProgress)
        bar.advance(bar.add_task("silent", total=3), 3)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan"])
def test_a_bad_interval_names_the_variable(value, monkeypatch):
    monkeypatch.setenv("PYTEI_PROGRESS_INTERVAL", value)
    with pytest.raises(ProgressSettingError, match="PYTEI_PROGRESS_INTERVAL"), progress_bar(plain=True):
        pass


def test_a_campaign_into_a_pipe_prints_progress_lines(tmp_path, monkeypatch, capsys):
    from pytei.cli import main

    spec = tmp_path / "tiny.toml"
    spec.write_text(
        'name = "tiny"\nruns = 2\nmetrics = ["rmse"]\ntargets = [{ component = "mlp", params = "weight" }]\n'
        "[[models]]\ndummy = { mlp_depth = 1, mlp_hidden = 64, embed_dim = 64, sparsity = 0.01 }\n"
        'samples = 32\n\n[errors]\nmodel = "BitFlip"\nrates = [1e-5, 1e-4]\n'
    )
    monkeypatch.setenv("PYTEI_PROGRESS_INTERVAL", "1e-9")  # a line at every trial
    assert main(["campaign", "run", str(spec), "--db", str(tmp_path / "t.db")]) == 0
    lines = [
        line for line in capsys.readouterr().out.splitlines() if re.match(r"campaign tiny: \d+/4 ", line)
    ]
    assert len(lines) == 4, lines  # trials 1-3, then the final line
    assert lines[-1].startswith("campaign tiny: 4/4 (100.0%), ") and "ETA 0:00:00" in lines[-1]
