"""`pixellm shards build-all`: every corpus of a recipe's mixture from one sources file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pixellm.cli import main as cli_main
from pixellm.data.build_all import load_sources
from pixellm.data.corpus import generate_corpus
from pixellm.data.shards import read_manifest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "platform" / "recipes" / "tiny.yaml")
# The generated corpus's directories -> the mixture names of the tiny recipe (relative paths).
SOURCES = {
    "sem_seg": {"format": "coco", "input": "corpus/coco/instances.json"},
    "refer_seg": {"format": "refer", "input": "corpus/refer"},
    "vqa": {"format": "llava", "input": "corpus/llava/llava_instruct.json"},
    "muse": {"format": "muse", "input": "corpus/muse", "images": "corpus/images"},
    "reason_seg": {"format": "reasonseg", "input": "corpus/reasonseg"},
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build-all")
    generate_corpus(root / "corpus", seed=0, images=6, image_size=64)
    return root


def _write(path: Path, corpora: dict) -> Path:
    path.write_text(yaml.safe_dump({"corpora": corpora}))
    return path


def test_build_all_writes_every_mixture_corpus_where_the_mixture_reads_it(corpus_dir, capsys):
    sources = _write(corpus_dir / "sources.yaml", SOURCES)
    out = corpus_dir / "shards"
    rc = cli_main(
        [
            "shards",
            "build-all",
            "--recipe",
            TINY,
            "--sources",
            str(sources),
            "--out",
            str(out),
            "--engine",
            "local",
        ]  # fmt: skip
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == set(SOURCES)
    mixture = yaml.safe_load(Path(TINY).read_text())["data"]["mixture"]
    for name in SOURCES:
        manifest = read_manifest(str(out / name))
        assert manifest is not None, name
        assert manifest["corpus"] == name
        assert sum(s["rows"] for s in manifest["splits"].values()) > 0, name
        assert summary[name]["in_mixture"] == (name in mixture)
    assert summary["muse"]["rows"].keys() >= {"train", "val"}


def test_build_all_refuses_a_mixture_corpus_without_source_before_converting(corpus_dir, capsys):
    partial = {k: v for k, v in SOURCES.items() if k not in ("vqa", "sem_seg")}
    sources = _write(corpus_dir / "partial.yaml", partial)
    out = corpus_dir / "never"
    rc = cli_main(
        [
            "shards",
            "build-all",
            "--recipe",
            TINY,
            "--sources",
            str(sources),
            "--out",
            str(out),
            "--engine",
            "local",
        ]  # fmt: skip
    )
    message = capsys.readouterr().out
    assert rc == 2
    assert "['sem_seg', 'vqa']" in message and "partial.yaml" in message, message
    assert not out.exists()


def test_sources_file_errors_name_the_field(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"muse": {"format": "lvis", "input": "x"}})
    with pytest.raises(ValueError, match=r"unknown format \{'muse': 'lvis'\}"):
        load_sources(bad)
    typo = _write(tmp_path / "typo.yaml", {"muse": {"format": "muse", "inptu": "x"}})
    with pytest.raises(ValueError, match=r"corpora\.muse\.inptu"):
        load_sources(typo)


def test_the_example_sources_file_covers_the_7b_and_13b_mixtures():
    sources = load_sources(ROOT / "platform" / "data" / "sources.example.yaml")
    for name in ("pixellm-7b", "pixellm-13b"):
        recipe = yaml.safe_load((ROOT / "platform" / "recipes" / f"{name}.yaml").read_text())
        assert set(recipe["data"]["mixture"]) <= set(sources.corpora), name
    assert {s.format for s in sources.corpora.values()} == {
        "coco", "refer", "llava", "muse", "reasonseg"
    }  # fmt: skip
