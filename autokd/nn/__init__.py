"""nn.Module losses on top of torch.ops.autokd, for use in other codebases."""
