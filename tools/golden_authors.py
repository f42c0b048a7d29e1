"""Record golden outputs of the authors' own PixelLM code on the tiny seeded checkpoint.

Run by hand (never in CI), in a throwaway virtual environment with the authors' pins, against a
local export of their repository (MaverickRen/PixelLM, read at run time, never copied here):

    python3.11 -m venv /tmp/authors-venv
    /tmp/authors-venv/bin/pip install --no-deps transformers==4.31.0 tokenizers==0.13.3 \
        peft==0.4.0 einops==0.4.1 numpy==1.24.2 huggingface-hub==0.19.4 Pillow==9.4.0 \
        accelerate==0.21.0 scipy==1.10.1
    # torch, safetensors and sentencepiece come from our venv (appended after theirs on sys.path):
    echo $PWD/.venv/lib/python3.11/site-packages > \
        /tmp/authors-venv/lib/python3.11/site-packages/zz_ours.pth
    git --git-dir=<mirror of MaverickRen/PixelLM> archive HEAD -- '*.py' configs \
        | tar -x -C /tmp/pixellm-authors
    /tmp/authors-venv/bin/python tools/golden_authors.py --authors-repo /tmp/pixellm-authors

Shims (their code assumes a GPU and torchvision): ``Tensor.cuda`` returns the tensor itself,
``torch.cuda.empty_cache`` does nothing, and ``torchvision.transforms.functional.resize`` /
``to_pil_image`` are PIL's bilinear resize / ``Image.fromarray`` (what torchvision does for PIL
images). Everything else is their code: their tokenizer loading, conversation template,
``tokenizer_image_token``, ``ResizeLongestSide`` + ``preprocess``, ``PixelLMForCausalLM``
(``from_pretrained`` + ``initialize_vision_modules``), ``evaluate`` (generation) and
``model_forward(inference=True)`` (teacher-forced).

Writes ``tests/golden/authors_tiny.json`` (seed, file hashes, ids) and
``tests/golden/authors_tiny.safetensors`` (codebook states, fused decoder tokens, 128x128 logits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import transformers  # noqa: F401 - imported before the torchvision shim (it probes the package)
import transformers.models.clip.modeling_clip  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "golden"))
from authors_layout import ADDED, build_authors_layout, golden_image  # noqa: E402

SEED = 0
MAX_NEW_TOKENS = 16
CASES = [  # (image seed, (H, W), question, teacher-forced answer with k targets)
    (1, (300, 200), "What is in this image? Please output segmentation mask.", 1),
    (2, (180, 420), "Can you segment the dog and the cat in this image?", 2),
]


def _shim() -> None:
    from PIL import Image

    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.cuda.empty_cache = lambda: None
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = lambda img, size: img.resize((size[1], size[0]), Image.BILINEAR)
    functional.to_pil_image = lambda arr: Image.fromarray(arr)
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms = boxes.box_area = None  # only the unused automatic mask generator
    for name, mod in {
        "torchvision": types.ModuleType("torchvision"),
        "torchvision.transforms": types.ModuleType("torchvision.transforms"),
        "torchvision.transforms.functional": functional,
        "torchvision.ops": types.ModuleType("torchvision.ops"),
        "torchvision.ops.boxes": boxes,
    }.items():
        sys.modules[name] = mod


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".json"  # JSON configs hold the temporary path
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors-repo", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "golden" / "authors_tiny")
    args = parser.parse_args()
    _shim()
    sys.path.insert(0, str(args.authors_repo))
    from model.llava import conversation as conversation_lib
    from model.llava.mm_utils import tokenizer_image_token
    from model.PixelLM import PixelLMForCausalLM
    from model.segment_anything.utils.transforms import ResizeLongestSide
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPImageProcessor
    from utils.utils import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN

    chat = {}
    exec(  # their chat.py's preprocess(), read from their file (not copied into this repo)
        compile(
            "import torch\nimport torch.nn.functional as F\n"
            + _function_source(args.authors_repo / "chat.py", "preprocess"),
            "chat.py",
            "exec",
        ),
        chat,
    )
    tmp = Path(tempfile.mkdtemp(prefix="golden-authors-"))
    build_authors_layout(tmp, SEED)
    ckpt, clip = tmp / "checkpoint", tmp / "clip"

    tokenizer = AutoTokenizer.from_pretrained(
        str(ckpt), model_max_length=512, padding_side="right", use_fast=False
    )
    tokenizer.pad_token = tokenizer.unk_token
    seg_tokens = [f"[SEG{i}]" for i in range(6)]
    tokenizer.add_tokens(seg_tokens)
    seg_token_idx = [tokenizer(t, add_special_tokens=False).input_ids[0] for t in seg_tokens]
    tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    model = PixelLMForCausalLM.from_pretrained(
        str(ckpt),
        low_cpu_mem_usage=True,
        vision_tower=str(clip),
        seg_token_idx=seg_token_idx,
        torch_dtype=torch.float32,
        seg_token_num=3,
        image_feature_scale_num=2,
        pad_train_clip_images=True,
        resize_vision_tower=True,
        resize_vision_tower_size=448,
        vision_tower_for_mask=True,
        separate_mm_projector=True,
    )
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.get_model().initialize_vision_modules(model.get_model().config)
    model = model.float().eval()
    _check_loaded(model, ckpt)

    processor = CLIPImageProcessor.from_pretrained(
        str(args.authors_repo / "configs" / "preprocessor_448.json")
    )
    transform_clip = ResizeLongestSide(processor.size["shortest_edge"])
    captured: dict[str, list] = {"logits": [], "fused": []}
    post = model.postprocess_masks
    model.postprocess_masks = lambda masks, **kw: (
        captured["logits"].append(masks[:, 0]),
        post(masks, **kw),
    )[1]
    model.model.prompt_encoder.register_forward_hook(
        lambda mod, a, kw, out: captured["fused"].append(kw["text_embeds"].detach().clone()),
        with_kwargs=True,
    )
    hidden: list[torch.Tensor] = []
    model.model.text_hidden_fcs[0].register_forward_hook(
        lambda mod, inp, out: hidden.append(inp[0].detach().clone())
    )

    record = {
        "seed": SEED,
        "max_new_tokens": MAX_NEW_TOKENS,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "layout_sha256": _hashes(tmp),
        "seg_token_idx": seg_token_idx,
        "seg_token_ids_by_name": tokenizer.convert_tokens_to_ids(seg_tokens),
        "added_tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in ADDED},
        "cases": [],
    }
    tensors: dict[str, torch.Tensor] = {}
    for n, (img_seed, hw, question, k) in enumerate(CASES):
        image_np = golden_image(img_seed, hw)
        image_clip = transform_clip.apply_image(image_np)
        clip_resize = image_clip.shape[:2]
        x = chat["preprocess"](
            torch.from_numpy(image_clip).permute(2, 0, 1).contiguous(),
            img_size=processor.size["shortest_edge"],
        )[None].float()
        prompt_text = DEFAULT_IMAGE_TOKEN + "\n" + question
        prompt_text = prompt_text.replace(
            DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        )
        conv = conversation_lib.conv_templates["llava_v1"].copy()
        conv.messages = []
        conv.append_message(conv.roles[0], prompt_text)
        conv.append_message(conv.roles[1], "")
        prompt_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")
        captured["logits"].clear()
        with torch.no_grad():
            output_ids, _, _, _ = model.evaluate(
                x,
                x,
                prompt_ids[None],
                [hw],
                clip_resize_list=[clip_resize],
                original_size_list=[hw],
                max_new_tokens=MAX_NEW_TOKENS,
                tokenizer=tokenizer,
            )
        generated = output_ids[0][0, prompt_ids.shape[0] :].tolist()
        # teacher-forced: the answer with k targets, as their validation did for refCOCO
        group = " ".join(seg_tokens)
        answer = "Sure, " + " and ".join([group] * k) + "."
        conv = conversation_lib.conv_templates["llava_v1"].copy()
        conv.messages = []
        conv.append_message(conv.roles[0], prompt_text)
        conv.append_message(conv.roles[1], answer)
        tf_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
        captured["logits"].clear()
        captured["fused"].clear()
        hidden.clear()
        with torch.no_grad():
            model.model_forward(
                images=x,
                images_clip=x,
                input_ids=tf_ids,
                labels=None,
                attention_masks=torch.ones_like(tf_ids),
                offset=torch.tensor([0, 1]),
                masks_list=[torch.zeros(k, *hw)],
                label_list=[torch.zeros(hw)],
                resize_list=[hw],
                clip_resize_list=[clip_resize],
                inference=True,
            )
        seg = torch.zeros_like(tf_ids[:, 1:], dtype=torch.bool)
        for i in seg_token_idx:
            seg |= tf_ids[:, 1:] == i
        seg = torch.cat(
            [torch.zeros(1, 255, dtype=torch.bool), seg, torch.zeros(1, 1, dtype=torch.bool)], 1
        )
        tensors[f"case{n}.states"] = hidden[0][seg].contiguous()  # (6k, H) LLM states used
        tensors[f"case{n}.fused"] = captured["fused"][0].contiguous()  # (k, 2, 256)
        tensors[f"case{n}.logits"] = captured["logits"][0].float().contiguous()  # (k, 128, 128)
        record["cases"].append(
            {
                "image_seed": img_seed,
                "hw": list(hw),
                "question": question,
                "targets": k,
                "clip_resize": list(clip_resize),
                "prompt_ids": prompt_ids.tolist(),
                "generated_ids": generated,
                "teacher_forced_ids": tf_ids[0].tolist(),
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out.with_suffix(".safetensors")))
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out.with_suffix('.json')} and .safetensors ({len(tensors)} tensors)")


def _function_source(path: Path, name: str) -> str:
    """The source of one top-level function of a file (read at run time)."""
    import ast

    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(text, node) or ""
    raise SystemExit(f"{path}: no function {name}")


def _check_loaded(model: torch.nn.Module, ckpt: Path) -> None:
    """Every tensor of their model came from the checkpoint (no silent random init), and the
    checkpoint's key set equals their model's (vision tower excluded)."""
    index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(torch.load(ckpt / shard, weights_only=True))
    ours = {k: v for k, v in model.state_dict().items() if "vision_tower" not in k}
    if set(ours) != set(state):
        raise SystemExit(
            f"key sets differ: only in their model {sorted(set(ours) - set(state))[:10]}, "
            f"only in the tiny checkpoint {sorted(set(state) - set(ours))[:10]}"
        )
    bad = [k for k, v in state.items() if not torch.equal(ours[k].float(), v.float())]
    if bad:
        raise SystemExit(f"tensors not loaded from the checkpoint: {bad[:10]}")


if __name__ == "__main__":
    main()
