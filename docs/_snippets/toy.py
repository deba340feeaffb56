import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ConvNet(L.LightningModule):
    """Two conv-BN-ReLU blocks and a linear classifier: 16 + 32 BN channels."""

    def __init__(self, width: int = 16, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()  # load_pruned rebuilds the module from them
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 4),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        # Built from self.parameters() on every call: PruneAndFinetune calls
        # it again after pruning.
        lr = self.hparams.lr
        return torch.optim.SGD(
            self.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4
        )


def toy_loader(n: int = 128, seed: int = 0) -> DataLoader:
    """16x16 noise images; class 0-2 brightens that colour channel, 3 none."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g)
    x[y < 3, y[y < 3]] += 1.0
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
