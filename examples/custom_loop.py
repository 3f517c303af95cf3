"""mixtail's loader and SMC loss in a plain PyTorch loop: your model, your optimizer, no mixtail trainer.

    python examples/custom_loop.py [--steps 60] [--device cpu]

Trains a small CNN of its own on the built-in demo set (no download): logit-adjusted soft CE on the mixed
labels plus 0.1 x SMC on the embeddings of both views, printing one `step N loss L` line per step.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import mixtail


def main(argv=None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    cfg = mixtail.load_config("demo", ["--mix.start_epoch=0", "--mix.mix_prob=1.0"])  # every batch mixed
    loader = mixtail.build_loader(cfg.data, cfg.aug, cfg.mix, split="train", device=args.device, seed=0)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()).to(args.device)
    classifier, head = nn.Linear(64, loader.num_classes).to(args.device), nn.Linear(64, 128).to(args.device)
    params = [*body.parameters(), *classifier.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    log_prior = mixtail.log_class_prior(loader.class_counts, args.device)
    losses, epoch = [], 0
    while len(losses) < args.steps:
        loader.set_epoch(epoch)
        for batch in loader:  # images: (V·B, 3, 32, 32), both views of each pair; y_f, y_b, lam: (B,)
            feat = body(batch.images)
            v = batch.num_views
            ce = mixtail.logit_adjusted_soft_ce(classifier(feat), batch.soft_targets(loader.num_classes), log_prior)
            smc = mixtail.smc_loss(F.normalize(head(feat), dim=1), batch.y_f.repeat(v), batch.y_b.repeat(v),
                                   batch.lam.repeat(v), tau=0.1)
            loss = ce + 0.1 * smc
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            print(f"step {len(losses)} loss {losses[-1]:.4f}", flush=True)
            if len(losses) == args.steps:
                break
        epoch += 1
    loader.close()
    return losses


if __name__ == "__main__":
    main()
