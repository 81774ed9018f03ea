"""Every config in configs/ loads with its documented args and passes validate.check_config
(on the 8 test devices); the paper configs follow SMI's schedule at 224 px, patch 16."""
import importlib.util
import pathlib
import re

import pytest

from fedmitr_jax import config_base, validate
from fedmitr_jax.server import inversion

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
# configs/pretrain_*.py configure `python -m fedmitr_jax.pretrain`, with config_base.pretrain_config's fields.
FILES = sorted(p.stem for p in CONFIGS.glob("*.py") if not p.stem.startswith("pretrain_"))
PRETRAIN_FILES = sorted(p.stem for p in CONFIGS.glob("pretrain_*.py"))
PAPER = ("paper_cifar10", "paper_officehome", "paper_miniimagenet")
# Args each config documents, besides the default ''; '{root}' is a folder dataset made by the test.
DOCUMENTED_ARGS = {
    "cifar10_cpu": ["alpha=0.3,clients=10", "alpha=0.5"],
    "cifar10_cpu_full": ["alpha=0.3", "alpha=0.5,clients=10"],
    "smoke": ["clients=3"],
    "paper_cifar10": ["alpha=0.3", "alpha=0.5,clients=10", "model=S/16", "pretrained=/w/deit_tiny.safetensors",
                      "data=tfds,data_dir={root}", "data=shared"],
    "paper_officehome": ["root={root},domain=", "root={parent},domain=Real_World,alpha=0.3",
                         "root={parent},domain=all,clients=10,model=S/16", "root={parent},domain=Art"],
    "paper_miniimagenet": ["root={root}", "root={root},alpha=0.5,clients=10,model=S/16"],
    "cifar10_cpu_pretrained": ["backbone=W/backbone.npz,token_loss=0.5,alpha=0.3"],
    "central_gate": ["epochs=1", "backbone=W/backbone.npz,token_loss=0.5,epochs=30"],
    "pretrain_fractal": ["variant=Mu/4", "variant=Mi/4"],
    "pretrain_smoke": ["variant=Mu/4"],
}
# Configs that refuse to load without an arg (one that names what to do); tests load them with it.
REQUIRED_ARG = {"cifar10_cpu_pretrained": "backbone=W/backbone.npz"}


def load(name):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def dataset_root(tmp_path):
  """<parent>/<domain>/{train,test}/<class>/ for every OfficeHome domain name; returns <parent>/all."""
  for domain in ("all", "Art", "Clipart", "Product", "Real_World"):
    for split in ("train", "test"):
      for c in ("a", "b"):
        (tmp_path / domain / split / c).mkdir(parents=True)
  return tmp_path / "all"


def test_paper_configs_exist():
  assert set(PAPER) <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_config_loads_and_passes_check_config(name, dataset_root):
  module = load(name)
  if name in REQUIRED_ARG:
    with pytest.raises(ValueError, match="run the pretraining first"):
      module.get_config("")
  else:  # the default loads (a folder config fails check_config without root)
    module.get_config("")
  for arg in [REQUIRED_ARG.get(name, "")] + DOCUMENTED_ARGS.get(name, []):
    arg = arg.format(root=dataset_root, parent=dataset_root.parent)
    if name in PAPER[1:] and "root=" not in arg:
      continue
    config = module.get_config(arg)
    if config.model.pretrained_path:  # a file the test does not have; the rest is still checked
      config.model.pretrained_path = ""
    validate.check_config(config)


def _keys(tree, prefix=""):
  return {k for key, value in tree.items()
          for k in (_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key])}


@pytest.mark.parametrize("name", FILES)
def test_config_sets_only_fields_of_config_base(name):
  """base_config() is not locked, so a misspelt field would be silently added: compare the keys."""
  config = load(name).get_config(REQUIRED_ARG.get(name, ""))
  assert _keys(config.to_dict()) == _keys(config_base.base_config().to_dict())


@pytest.mark.parametrize("name", PRETRAIN_FILES)
def test_pretrain_config_loads_and_passes_check_config(name):
  from fedmitr_jax import pretrain
  module = load(name)
  for arg in [""] + DOCUMENTED_ARGS.get(name, []):
    config = module.get_config(arg)
    pretrain.check_config(config)
    assert _keys(config.to_dict()) == _keys(config_base.pretrain_config().to_dict())


def test_pretrain_fractal_variant_arg():
  module = load("pretrain_fractal")
  assert module.get_config("variant=Mi/4").model.variant == "Mi/4"
  with pytest.raises(ValueError, match="'variant'"):
    module.get_config("variant=Ti/16")


@pytest.mark.parametrize("name", FILES + PRETRAIN_FILES)
def test_docstring_commands_use_real_args(name):
  """Every `configs/<this file>.py:args` in the docstring parses."""
  module = load(name)
  for args in re.findall(rf"configs/{name}\.py:(\S+)", module.__doc__ or ""):
    module.get_config(args)


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
  return out


def test_pretrained_config_is_the_full_config_from_the_backbone():
  full = _flat(load("cifar10_cpu_full").get_config("alpha=0.3").to_dict())
  ours = _flat(load("cifar10_cpu_pretrained").get_config("backbone=W/b.npz,token_loss=0.5,alpha=0.3").to_dict())
  changed = {k: ours[k] for k in full if full[k] != ours[k]}
  assert changed == {"model.pretrained_path": "W/b.npz",
                     "clients.token_loss_weight": 0.5}


def test_central_gate_is_one_client_on_10k_images():
  c = load("central_gate").get_config("epochs=2")
  assert (c.partition.method, c.partition.num_clients, c.dataset.max_train_examples) == ("iid", 1, 10_000)
  assert tuple(c.methods) == ("fedavg", "ensemble") and c.model.variant == "Mi/4"
  assert (c.model.pretrained_path, c.clients.token_loss_weight, c.clients.epochs) == ("", 0.0, 2.0)
  c = load("central_gate").get_config("backbone=W/b.npz,token_loss=0.5")
  assert (c.model.pretrained_path, c.clients.token_loss_weight) == ("W/b.npz", 0.5)


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_follows_smi_at_224(name, dataset_root):
  for model in ("Ti/16", "S/16"):
    c = load(name).get_config(f"model={model}")
    assert c.model.variant == model
    assert c.dataset.image_size == 224 and c.model.variant.endswith("/16")
    assert c.inversion.iterations == 4000 and tuple(c.inversion.stops) == (50, 100, 200, 300)
    assert c.inversion.drop_ratio == 0.3 and c.inversion.lr == 0.25
    assert c.partition.method == "dirichlet" and c.partition.alpha == 0.1 and c.partition.num_clients == 5
    assert tuple(c.methods) == config_base.ALL_METHODS  # the paper table, DENSE and Co-Boosting too
    assert c.generator_kd.crop_padding == c.clients.crop_padding == 28
    for batch in (c.inversion.batch_size, c.distill.batch_size):
      assert batch & (batch - 1) == 0, "global batches are powers of two (any device count up to them)"
  num_patches = (224 // 16) ** 2
  assert inversion.keep_counts(num_patches, 4, 0.3) == [196, 137, 95, 66, 46]  # SMI's counts
  c = load(name).get_config("alpha=0.5,clients=10,pretrained=/w/x.npz")
  assert (c.partition.alpha, c.partition.num_clients, c.model.pretrained_path) == (0.5, 10, "/w/x.npz")


def test_officehome_domain_selects_a_subfolder(dataset_root):
  module = load("paper_officehome")
  parent = dataset_root.parent
  assert module.get_config(f"root={parent}").dataset.root == str(parent / "all")
  assert module.get_config(f"root={parent},domain=Clipart").dataset.root == str(parent / "Clipart")
  assert module.get_config(f"root={parent},domain=").dataset.root == str(parent)
  assert module.get_config("").dataset.root == ""


def test_cifar10_data_arg_picks_the_dataset_kind():
  module = load("paper_cifar10")
  assert module.get_config("").dataset.kind == "cifar10"
  assert module.get_config("data=shared").dataset.kind == "shared_cifar10"
  c = module.get_config("data=tfds,data_dir=/d/tfds")
  assert (c.dataset.kind, c.dataset.name, c.dataset.data_dir) == ("tfds", "cifar10", "/d/tfds")


@pytest.mark.parametrize("name,arg,named", [
    ("paper_cifar10", "alhpa=0.3", "alhpa"),
    ("paper_cifar10", "model=B/8", "model"),
    ("paper_cifar10", "data=hub", "data"),
    ("paper_officehome", "domain=Sketch", "domain"),
    ("paper_officehome", "model=Ti/8", "model"),
    ("paper_miniimagenet", "model=S/32", "model"),
    ("paper_miniimagenet", "domain=Art", "domain"),  # OfficeHome's arg, not Mini-ImageNet's
    ("cifar10_cpu", "clinets=10", "clinets"),
])
def test_bad_arg_names_the_arg(name, arg, named):
  with pytest.raises(ValueError, match=f"'{named}'"):
    load(name).get_config(arg)


def test_bad_arg_type_is_a_value_error():
  with pytest.raises(ValueError):
    load("paper_cifar10").get_config("alpha=abc")


def test_model_dtype_reaches_the_models():
  """model.dtype is the compute dtype of the ViTs the pipeline builds (float32 by default)."""
  import types

  import jax.numpy as jnp

  from fedmitr_jax import pipeline
  config = config_base.base_config()
  dataset = types.SimpleNamespace(num_classes=10)
  assert pipeline.client_model(config, dataset).dtype == jnp.float32
  config.model.dtype = "bfloat16"
  assert pipeline.client_model(config, dataset).dtype == jnp.bfloat16
