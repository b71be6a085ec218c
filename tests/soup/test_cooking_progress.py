"""What cooking prints while it runs (soup/cooking.py Progress): in a log file a line only
every so often, on a terminal one line redrawn in place and cleared before a recipe's line."""

import io
import time

from orchestrator.soup.cooking import Progress, watch


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_file_a_progress_line_comes_only_after_a_quiet_while():
    out = io.StringIO()
    progress = Progress(4, out, every=0.2)
    progress.update(3)  # just started: nothing yet
    assert out.getvalue() == ""
    time.sleep(0.25)
    progress.update(7)
    progress.recipe("  [1/4    1s] greedy_soup: 1 dish in 0.3 s")
    progress.update(9)  # a recipe just finished: quiet again
    assert out.getvalue().splitlines() == ["  [....................] 0/4 recipes, 7 evaluations, 0 s",
                                           "  [1/4    1s] greedy_soup: 1 dish in 0.3 s"]


def test_on_a_terminal_the_line_is_redrawn_and_cleared_for_each_recipe():
    out = Terminal()
    progress = Progress(2, out)
    progress.update(5)
    progress.update(6)
    progress.recipe("  [1/2    0s] ensemble: 1 dish in 0.1 s")
    progress.close()
    text = out.getvalue()
    assert text.count("\r  [") == 2 and "6 evaluations" in text
    assert text.endswith("\r\033[K  [1/2    0s] ensemble: 1 dish in 0.1 s\n")  # cleared, then the recipe line


def test_watch_reports_a_kitchens_evaluations_until_stopped():
    class Kitchen:
        evaluations = 0

    seen = []

    class Recorder(Progress):
        def update(self, evaluations):
            seen.append(evaluations)

    kitchen = Kitchen()
    stop = watch(kitchen, Recorder(1, io.StringIO()), period=0.05)
    for n in (1, 2, 3):
        kitchen.evaluations = n
        time.sleep(0.12)
    stop()
    after = len(seen)
    time.sleep(0.12)
    assert len(seen) == after and seen == sorted(seen) and seen[-1] == 3
