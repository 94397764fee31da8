"""The README's code for other programs is what the code writes: its timm block holds exactly the
call export puts into the model card for that setting (ViT-B/16 at 224 px, 7 classes, the
face statistics, `data.center_crop`), preprocessing fields included, so timm's standard
transforms feed the model as ours was fed. tests/test_timm_interop.py runs the block in
timm."""

import ast
import re

from configs import finetune as finetune_config
from ssfer_jax import export, pytorch_weights
from ssfer_jax.trainers import finetune
from tests.conftest import REPO

README_WEIGHTS = "exports/ss/model.safetensors"   # the README's export directory
README_CLASSES = 7


def readme_timm_block() -> str:
  """The README's one code block that calls timm.create_model."""
  blocks = re.findall(r"^```[^\n]*\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
  found = [b for b in blocks if "timm.create_model(" in b]
  assert len(found) == 1, f"{len(found)} README blocks call timm.create_model"
  return found[0]


def readme_timm_call(block: str) -> str:
  """The expression the block assigns to `model`."""
  calls = [ast.get_source_segment(block, node.value) for node in ast.parse(block).body
           if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["model"]]
  assert len(calls) == 1, block
  return calls[0]


def card_call() -> str:
  """What export writes as the card's timm call for the README's setting."""
  c = finetune_config.get_config("vit_b16")
  spec = pytorch_weights.timm_model(finetune.model_kwargs(c), README_CLASSES, c.data.image_size)
  return export.timm_call(spec["arch"], spec["kwargs"], README_WEIGHTS, c.data.mean, c.data.std,
                          c.data.center_crop)


def test_readme_timm_block_is_the_cards_call():
  readme = readme_timm_call(readme_timm_block())
  card = card_call()
  assert ast.dump(ast.parse(readme)) == ast.dump(ast.parse(card)), f"{readme}\n!=\n{card}"
  for field in ("input_size=(3, 224, 224)", "crop_pct=1.0", "interpolation='bilinear'"):
    assert field in card
