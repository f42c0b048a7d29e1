"""`pixellm flops` counts real-size models on the meta device (no memory, no weights)."""

import json

from pixellm.cli import main


def test_flops_json_for_the_7b_recipe(capsys):
    assert main(["flops", "--recipe", "platform/recipes/pixellm-7b.yaml", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"pixellm_tflops", "lisa_tflops", "ratio", "assumptions"} <= set(result)
    # PixelLM avoids SAM's ViT-H at 1024²: LISA must cost more; SAM ViT-H alone is ~3 TMACs.
    assert result["lisa_tflops"] > result["pixellm_tflops"] > 0
    assert 5.0 < result["breakdown_tflops"]["lisa_sam"] < 7.0
    assert abs(result["ratio"] - result["lisa_tflops"] / result["pixellm_tflops"]) < 0.01
    assert result["assumptions"]["architecture"] == "llava-1.5-7b"
    assert result["assumptions"]["num_targets"] == 3
