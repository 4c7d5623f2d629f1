"""Running the command line in a test: its exit status, and the one error line it printed."""

from editor_reid.cli import main


def exit_code(argv: list[str]) -> int:
    """``main``'s exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_line(err: str) -> str:
    """The single ``editor-reid: ...`` line of ``err``; fails on more lines or a traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("editor-reid:") and "Traceback" not in err, err
    return lines[0]
