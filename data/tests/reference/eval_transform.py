"""Reference for mgrun-data's evaluation transform: PIL decode -> RGB -> torchvision Resize((S, S)) (bilinear,
antialiased, as DomainBed) -> ToTensor -> Normalize(ImageNet). Usage: eval_transform.py SIZE OUT.json IMAGE...
Writes {"x": [...]} with the images' CHW floats concatenated."""
import json
import sys

import torch
from PIL import Image
from torchvision import transforms

size, out_path, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
transform = transforms.Compose([
    transforms.Resize((size, size)),
    transforms.ToTensor(),
    transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])
x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
with open(out_path, "w") as f:
    json.dump({"x": x.flatten().tolist()}, f)
