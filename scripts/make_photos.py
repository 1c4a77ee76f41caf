"""Regenerate training/photos/: real photos from scikit-image, scikit-learn and matplotlib sample data,
centre-cropped to a square and resized to 224×224 RGB PNG, with their sources and licences.

Run: .venv/bin/pip install -e ".[photos]" && .venv/bin/python scripts/make_photos.py
"""

from pathlib import Path

import matplotlib.cbook
import numpy as np
import skimage.data as sk
from PIL import Image
from sklearn.datasets import load_sample_image

OUT = Path(__file__).resolve().parents[1] / "training" / "photos"

SK = "scikit-image `skimage.data`"
# name -> (loader, source, licence as stated by the shipping package)
PHOTOS = {
    "chelsea": (sk.chelsea, f"{SK}.chelsea (Stefan van der Walt)", "CC0"),
    "coffee": (sk.coffee, f"{SK}.coffee (Rachel Michetti, Pikolo Espresso Bar)", "CC0"),
    "astronaut": (sk.astronaut, f"{SK}.astronaut (NASA, Eileen Collins)", "public domain"),
    "rocket": (sk.rocket, f"{SK}.rocket (SpaceX, DSCOVR launch)", "public domain"),
    "hubble_deep_field": (sk.hubble_deep_field, f"{SK}.hubble_deep_field (NASA)", "public domain"),
    "immunohistochemistry": (sk.immunohistochemistry, f"{SK}.immunohistochemistry", "no known copyright restrictions"),
    "retina": (sk.retina, f"{SK}.retina (Wikimedia, fundus photograph)", "CC0 1.0"),
    "camera": (sk.camera, f"{SK}.camera (Lav Varshney), grayscale", "CC0"),
    "coins": (sk.coins, f"{SK}.coins (Greek coins, Pompeii), grayscale", "no known copyright restrictions"),
    "moon": (sk.moon, f"{SK}.moon, grayscale", "no known copyright restrictions"),
    "clock": (sk.clock, f"{SK}.clock (Stefan van der Walt), grayscale", "public domain"),
    "brick": (sk.brick, f"{SK}.brick (CC0Textures Bricks25), grayscale", "CC0"),
    "motorcycle": (lambda: sk.stereo_motorcycle()[0], f"{SK}.stereo_motorcycle left view (Middlebury 2014 stereo)",
                   "research dataset redistributed in scikit-image (BSD-3 package)"),
    "china": (lambda: load_sample_image("china.jpg"), "scikit-learn `load_sample_image('china.jpg')` (danielbuechele, Flickr)",
              "CC BY 2.0"),
    "flower": (lambda: load_sample_image("flower.jpg"), "scikit-learn `load_sample_image('flower.jpg')` (vultilion, Flickr)",
               "CC BY 2.0"),
    "grace_hopper": (lambda: np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))),
                     "matplotlib sample_data/grace_hopper.jpg (US Navy portrait)", "public domain"),
}


def to_224(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
    img = Image.fromarray(a).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((224, 224), Image.BICUBIC)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = ["# Bundled photos", "", "224×224 RGB centre crops, made by `scripts/make_photos.py`.", "",
            "| file | source | licence |", "|---|---|---|"]
    for name, (load, src, lic) in PHOTOS.items():
        to_224(load()).save(OUT / f"{name}.png", optimize=True)
        rows.append(f"| {name}.png | {src} | {lic} |")
    (OUT / "SOURCES.md").write_text("\n".join(rows) + "\n")
    print(f"wrote {len(PHOTOS)} photos to {OUT}")


if __name__ == "__main__":
    main()
