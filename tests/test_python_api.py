"""docs/python_api.md is a runnable example: its code block runs as it is, and does what the page says."""

import os
import re
import runpy
from pathlib import Path

PAGE = Path(__file__).parent.parent / "docs" / "python_api.md"


def test_the_python_api_page_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    assert len(blocks) == 1, "the page has one example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "example.py").write_text(blocks[0])
    runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    out = capsys.readouterr().out
    accuracy = float(re.search(r"int8 accuracy: ([\d.]+)", out).group(1))
    assert accuracy > 0.9  # wine is easy once standardized: a wrong quantization shows here
    work = tmp_path / "api-example"
    for name in ("wine.ftm", "wine.ftp", "wine_c/model.c", "wine_c/Makefile", "run/global.ftm", "run/summary.md"):
        assert (work / name).stat().st_size > 0, name
    rounds = re.search(r"global accuracy per round: \[(.*)\]", out).group(1).split(",")
    assert len(rounds) == 2 and all(0 <= float(r) <= 1 for r in rounds)
