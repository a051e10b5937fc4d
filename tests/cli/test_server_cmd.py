"""`vpr serve` refuses what the server would refuse before it says it serves,
and its help tells the selection order that the runtime follows; `vpr query`
without a server is one line and exit status 2."""

from __future__ import annotations

import pytest

from tests.cli.test_defaults import subparser
from vpr.cli.main import main


@pytest.fixture
def no_serving(monkeypatch):
    """`serve` must not be reached: it would block on a port."""

    def refuse(settings):
        raise AssertionError(f"serve() was called with {settings}")

    monkeypatch.setattr("vpr.server.app.serve", refuse)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "cuda:99"], "device cuda:99 requested but CUDA (or that GPU) is not available"),
        (["--admin-token-file", "no/such/token"], "cannot read the admin token file"),
    ],
)
def test_serve_refuses_before_announcing(tmp_path, capsys, no_serving, flags, message):
    assert main(["--home", str(tmp_path / "home"), "serve", "--demo", *flags]) == 2
    out, err = capsys.readouterr()
    assert "serving on" not in out and "demo ready" not in out
    assert err.count("\n") == 1 and err.startswith("vpr serve: error: ") and message in err
    assert not (tmp_path / "home" / "demo").exists()  # nothing was built for a server that cannot start


def test_serve_help_tells_the_selection_order():
    text = " ".join(subparser("serve").format_help().split())
    assert "the active query model" not in text  # what an admin chose wins over the active pointer
    model = text[text.rindex("--model MODEL") :]  # the option, not the usage line
    order = ["$VPR_MODEL", "last chosen through the admin API", "serving.json", "newest student", "teacher"]
    positions = [model.index(words) for words in order]
    assert positions == sorted(positions), model[:400]
    index = text[text.rindex("--index INDEX") :]
    assert index.index("$VPR_INDEX") < index.index("last chosen through the admin API") < index.index("the only index")


def test_query_without_a_server_is_one_line(tmp_path, capsys):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"\xff\xd8\xff")
    assert main(["query", "--url", "http://127.0.0.1:9", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vpr query: error: http://127.0.0.1:9"), err
