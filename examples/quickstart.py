"""Quickstart: BYOL-pretrain a ResNet-18 for a few steps on random images (CPU, a few seconds)."""

import torch
import torchvision

from byol_wrapper import BYOL

torch.manual_seed(0)
resnet = torchvision.models.resnet18()                          # any backbone; its classifier head is not used
learner = BYOL(resnet, image_size=32, hidden_layer="avgpool")   # builds the heads and the EMA target
opt = torch.optim.Adam(learner.parameters(), lr=3e-4)

for step in range(3):
    images = torch.rand(16, 3, 32, 32)   # stand-in for your loader: (B, C, H, W), float in [0, 1] or uint8
    loss = learner(images)               # two per-sample augmented views, symmetric BYOL loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    learner.update_moving_average()      # EMA update of the target network, once per optimizer step
    print(f"step {step}: loss {loss.item():.4f}")

learner.eval()
with torch.no_grad():
    projection, embedding = learner(images, return_embedding=True)   # (16, 256) and (16, 512)
print(f"projection {tuple(projection.shape)}, embedding {tuple(embedding.shape)}")
torch.save(resnet.state_dict(), "pretrained.pt")   # the backbone you passed in is the one trained
