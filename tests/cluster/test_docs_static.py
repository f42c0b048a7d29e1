"""Static checks of every documented command (docs/cluster.md and the README): no process started.

The blocks that cannot run here (cloud launcher, Kubernetes) are checked command by command; the
blocks that run locally (test_docs_commands.py) are parsed here too, so a flag a CLI no longer
takes fails in seconds, before the slow test starts a cluster.
"""

from __future__ import annotations

import pytest

from tests.cluster.doc_commands import (
    DOC,
    README,
    Block,
    blocks,
    check_static,
    commands,
    kubernetes_names,
    substitute,
    substitutions,
)

DOC_BLOCKS = blocks(DOC)
README_BLOCKS = blocks(README)
ALL = DOC_BLOCKS + README_BLOCKS
VALUES = {
    "tmp": "/tmp/x",
    "recipe": "/tmp/x/recipe.yaml",
    "model": "m",
    "sources": "/tmp/x/sources.yaml",
    "cluster_dir": "/tmp/x/cluster",
    "serve_port": "1",
}


def test_every_bash_block_of_the_cluster_doc_is_tagged_run_or_static():
    untagged = [b.where for b in DOC_BLOCKS if b.mode is None]
    assert untagged == [], (
        f"tag these blocks <!-- docs-test: runs locally|static (why) -->: {untagged}"
    )
    assert {b.mode for b in DOC_BLOCKS} == {"run", "static"}
    assert all(b.note for b in DOC_BLOCKS if b.mode == "static"), "say why a block cannot run here"


@pytest.mark.parametrize("block", ALL, ids=lambda b: b.where)
def test_documented_commands_parse_and_name_what_exists(block: Block):
    created: set[str] = set()
    check_static(block, created)


def test_every_secret_the_manifests_read_is_created_in_the_docs():
    created: set[str] = set()
    for block in DOC_BLOCKS:
        if block.mode == "static":
            check_static(block, created)
    used = kubernetes_names()["secret_keys"]
    assert used <= created, (
        f"secrets the manifests read but docs/cluster.md never creates: {used - created}"
    )
    assert created <= used, (
        f"secrets docs/cluster.md creates that no manifest reads: {created - used}"
    )


@pytest.mark.parametrize(
    "block", [b for b in ALL if b.mode == "run"], ids=lambda b: b.where
)  # fmt: skip
def test_run_blocks_touch_nothing_of_a_real_cluster_after_substitution(block: Block):
    text = substitute(block.text, substitutions(), VALUES)
    for cloud_only in ("/mnt/shared", "gpu-pip.yaml", "pixellm-7b", "pixellm-13b", ":8000"):
        assert cloud_only not in text, f"{block.where}: {cloud_only!r} left after substitution"
    for words in commands(text):
        assert "--address" not in words, f"{block.where}: documented commands never pass --address"


def test_the_substitution_table_only_swaps_paths_recipes_and_sizes():
    for documented, local in substitutions():
        assert documented and local and documented != local
        assert "--address" not in local, "a substitution must not add the cluster address"
