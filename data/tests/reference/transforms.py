"""Reference for mgrun-data's DomainBed transforms: torchvision's functional ops on PIL images, with the random
parameters given. Usage: transforms.py CASES.json OUT.json

CASES.json: {"cases": [{"image": PATH, "op": NAME, ...}]}; ops:
  resize {size}                         F.resize(img, [size, size])                (DomainBed's eval Resize)
  resized_crop {top,left,height,width,size}  F.resized_crop(..., [size, size], BILINEAR)
  hflip | grayscale                     F.hflip | F.rgb_to_grayscale(img, 3)
  brightness|contrast|saturation|hue {factor}  F.adjust_*
  train {crop: [top,left,h,w], size, flip, jitter: [[op, factor], ...], grayscale}
        the whole training transform, then ToTensor + Normalize (ImageNet)
Writes {"outputs": [...]}: uint8 HWC pixels flattened per case, or for "train" the CHW floats."""
import json
import sys

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
JITTER = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
          "saturation": F.adjust_saturation, "hue": F.adjust_hue}


def run(case):
    img = Image.open(case["image"]).convert("RGB")
    op = case["op"]
    if op == "resize":
        out = F.resize(img, [case["size"], case["size"]])
    elif op == "resized_crop":
        out = F.resized_crop(img, case["top"], case["left"], case["height"], case["width"],
                             [case["size"], case["size"]], InterpolationMode.BILINEAR)
    elif op == "hflip":
        out = F.hflip(img)
    elif op == "grayscale":
        out = F.rgb_to_grayscale(img, num_output_channels=3)
    elif op in JITTER:
        out = JITTER[op](img, case["factor"])
    elif op == "train":
        top, left, h, w = case["crop"]
        out = F.resized_crop(img, top, left, h, w, [case["size"], case["size"]], InterpolationMode.BILINEAR)
        if case["flip"]:
            out = F.hflip(out)
        for name, factor in case["jitter"]:
            out = JITTER[name](out, factor)
        if case["grayscale"]:
            out = F.rgb_to_grayscale(out, num_output_channels=3)
        x = F.normalize(F.to_tensor(out), MEAN, STD)
        return x.flatten().tolist()
    else:
        raise ValueError(f"unknown op {op}")
    return np.asarray(out.convert("RGB"), dtype=np.uint8).flatten().tolist()


cases = json.load(open(sys.argv[1]))["cases"]
with open(sys.argv[2], "w") as f:
    json.dump({"outputs": [run(c) for c in cases]}, f)
