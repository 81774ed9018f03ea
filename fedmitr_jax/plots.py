"""Pictures people would rather look at than read: synthetic images with their patch masks."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from fedmitr_jax.data import datasets  # noqa: E402
from fedmitr_jax.models import vit  # noqa: E402


def save_bank_grid(bank, class_names, variant: str, path, per_class: int = 4) -> None:
  """One row per class: each image beside itself with dropped (background) patches darkened
  and the kept foreground outlined in red."""
  patch = vit.parse_variant(variant).patch_size
  labels, masks = np.asarray(bank["labels"]), np.asarray(bank["masks"])
  images = np.asarray(bank["images"], np.float32)  # a bfloat16 bank (inversion.bank_dtype) too
  classes = [c for c in range(len(class_names)) if (labels == c).any()]
  if not classes:
    return
  fig, axes = plt.subplots(len(classes), 2 * per_class, figsize=(2 * per_class * 1.1, len(classes) * 1.2),
                           squeeze=False)
  for row, c in enumerate(classes):
    chosen = np.flatnonzero(labels == c)[:per_class]
    for j in range(per_class):
      raw_ax, mask_ax = axes[row, 2 * j], axes[row, 2 * j + 1]
      for ax in (raw_ax, mask_ax):
        ax.set_xticks([]), ax.set_yticks([])
      if j >= len(chosen):
        raw_ax.axis("off"), mask_ax.axis("off")
        continue
      i = chosen[j]
      picture = datasets.denormalize(images[i])
      raw_ax.imshow(picture)
      grid = int(round(np.sqrt(masks.shape[1])))
      pixel_mask = np.kron(masks[i].reshape(grid, grid), np.ones((patch, patch)))[..., None]
      mask_ax.imshow((picture * (0.25 + 0.75 * pixel_mask)).astype(np.uint8))
      mask_ax.contour(pixel_mask[..., 0], levels=[0.5], colors="red", linewidths=0.6)
    axes[row, 0].set_ylabel(class_names[c], rotation=0, ha="right", fontsize=8)
  fig.suptitle(f"synthetic images (left) and kept patches (right, {100 * masks.mean():.0f}% kept)",
               fontsize=9)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:  # a local file or a bucket object
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)
