"""gptforge.progress.Progress, the one mechanism every long step shows its progress with: a tqdm bar on a
terminal, and off one (a pipe, a log, CI) a plain line every EVERY_S seconds and never a carriage return. The
clock is injected, so no test sleeps."""

import io

from gptforge import progress as progress_module
from gptforge.progress import EVERY_S, Progress


class Clock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_a_plain_line_every_period_and_none_before():
    clock, out = Clock(), io.StringIO()
    with Progress(400, "eval", stream=out, clock=clock) as p:
        p.update(10)
        clock.t += EVERY_S - 1
        p.update(10)
        assert out.getvalue() == ""  # a step shorter than the period says nothing
        clock.t += 1
        p.update(100)  # 120 of 400 after 30 s: 280 more at that rate
        clock.t += EVERY_S
        p.update(80)
        clock.t += 5
        p.update(200)
    lines = out.getvalue().splitlines()
    assert lines == ["eval: 120/400 batches (30%), 30s, ~1m10s left",
                     "eval: 200/400 batches (50%), 1m00s, ~1m00s left",
                     "eval: 400/400 batches (100%), 1m05s"]  # the last at close: when it ended
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_lines_carry_the_postfix_sizes_and_an_unknown_total():
    clock, out = Clock(), io.StringIO()
    with Progress(None, "read conversations", unit="conv", unit_scale=True, stream=out, clock=clock) as p:
        p.set_postfix_str("3 bad rows")
        clock.t += EVERY_S
        p.update(12_345)
    with Progress(4 << 20, "encode (char)", unit="B", unit_scale=True, initial=1 << 20, stream=out, clock=clock) as p:
        clock.t += EVERY_S
        p.update(1 << 20)  # resumed at 1 MiB: the rate counts this session's MiB only
    assert out.getvalue().splitlines() == ["read conversations: 12.3k conversations, 30s | 3 bad rows",
                                           "encode (char): 2.00MB/4.00MB (50%), 30s, ~1m00s left"]


def test_a_terminal_gets_a_bar_and_disabled_shows_nothing():
    tty = Tty()
    with Progress(10, "eval", stream=tty) as p:
        p.update(5)
        p.bar.refresh()
    assert "eval" in tty.getvalue() and "5/10" in tty.getvalue()

    clock, out = Clock(), io.StringIO()
    with Progress(10, "eval", stream=out, enabled=False, clock=clock) as p:
        clock.t += 10 * EVERY_S
        p.update(10)
    assert out.getvalue() == ""


def test_the_default_clock_is_the_modules_at_construction(monkeypatch):
    """Steps a test drives from outside (an evaluation, prepare) time with progress.CLOCK, which it replaces."""
    clock, out = Clock(), io.StringIO()
    monkeypatch.setattr(progress_module, "CLOCK", clock)
    p = Progress(2, "x", stream=out)
    clock.t += EVERY_S
    p.update()
    p.close()
    p.close()  # a second close writes nothing more
    assert out.getvalue().splitlines() == ["x: 1/2 batches (50%), 30s, ~30s left"]  # nothing new to say at close
