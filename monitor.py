"""Watching a pretraining run: the kNN monitor (embedding kept apart from voting), nearest neighbours, and
the collapse statistics of the projector output (paper Sec. 4.1, Fig. 2)."""
import torch
import torch.nn.functional as F

import distributed
import stream
from augment import normalize
from distributed import SINGLE

# z_std_ratio under this is reported: a ratio r means the normalised outputs spread like those of a
# uniform distribution over r^2 of the d dimensions (0.2 -> 4%, some 80 of 2048); a collapsed run is at 0.
COLLAPSE_THRESHOLD = 0.2


# ----------------------------------------------------------------------------- kNN

def knn_predict(feature, feature_bank, feature_labels, classes, k, t, chunk_size=1024):
    """Weighted kNN classification (Wu et al. 2018, InstDisc; used for monitoring in the SimSiam line).

    feature (B, D) and feature_bank (N, D) are L2-normalised; feature_labels (N,) int64.
    Each query takes its k most cosine-similar bank items, weights each vote by exp(sim / t), sums per
    class and returns the classes sorted by score, best first: (B, classes). Queries are processed in
    chunks so only a (chunk_size, N) similarity matrix is ever held.
    """
    bank = feature_bank.float()
    out = []
    for query in feature.float().split(chunk_size):
        sim = query @ bank.T  # BxN
        sim_weight, sim_index = sim.topk(k, dim=-1)  # Bxk
        sim_labels = feature_labels[sim_index]  # Bxk
        weight = (sim_weight / t).exp()  # Bxk
        scores = torch.zeros(query.size(0), classes, device=query.device, dtype=weight.dtype)
        scores.scatter_add_(1, sim_labels, weight)  # BxC
        out.append(scores.sort(dim=-1, descending=True, stable=True).indices)
    return torch.cat(out)


@torch.no_grad()
def embed(fn, data, batch_size, device, ranges=None, num_workers=0):
    """L2-normalised float32 features (N, D) of an ImageSet's images under the test transform, normalised
    with its statistics: of every image in batches of batch_size, or of the rows [start, stop) of each of
    `ranges`, in order. A set of files (the stream path) is read with `num_workers` DataLoader workers."""
    if ranges is None:
        ranges = distributed.shard_chunks(len(data), batch_size, SINGLE)
    out = []
    for images, _ in stream.test_images(data, ranges, device, num_workers):
        out.append(F.normalize(fn(normalize(images, data.mean, data.std)).float(), dim=1))
    return torch.cat(out) if out else torch.empty(0, device=device)


def topk_correct(ranked, labels, ks=(1, 5)):
    """Number of rows whose label is among the first k ranked classes, for each k (k clipped to C)."""
    hits = ranked == labels.view(-1, 1)
    return [hits[:, :min(k, ranked.size(1))].any(dim=1).sum().item() for k in ks]


def knn_monitor(fn, bank, test, k, t, batch_size, device, world=SINGLE, num_workers=0):
    """kNN top-1 and top-5 accuracy (%) of the test set against a bank of training images, and the
    features (bank (N, D), test (M, D)) it compared.

    fn maps a normalised batch to features; the caller puts the model in eval mode. The bank uses the
    test transform (one view), as do the queries. Under torchrun each process embeds its chunks of the
    bank and of the queries (distributed.shard_chunks), the bank is gathered, each process classifies its
    queries, and the hit counts are summed: the same numbers as one process computes. Sets of files (the
    stream path) are read with `num_workers` DataLoader workers.
    """
    bank_local = embed(fn, bank, batch_size, device, distributed.shard_chunks(len(bank), batch_size, world),
                       num_workers)
    bank_features = distributed.gather_chunks(bank_local, len(bank), batch_size, world)
    ranges = distributed.shard_chunks(len(test), batch_size, world)
    test_local = embed(fn, test, batch_size, device, ranges, num_workers)
    hits = [0, 0]
    if ranges:
        labels = torch.cat([test.labels[start:stop] for start, stop in ranges]).to(device)
        ranked = knn_predict(test_local, bank_features, bank.labels.to(device), len(bank.classes), k, t)
        hits = topk_correct(ranked, labels)
    top1, top5 = distributed.all_sum(torch.tensor(hits, device=device), world).tolist()
    test_features = distributed.gather_chunks(test_local, len(test), batch_size, world)
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test), bank_features, test_features


def nearest(queries, bank, n):
    """Indices (Q, n) and cosine similarities (Q, n) of the n bank rows nearest each normalised query."""
    sim, index = (queries.float() @ bank.float().T).topk(min(n, len(bank)), dim=1)
    return index, sim


def neighbour_panel(bank, test, bank_features, test_features, n):
    """What the neighbours picture shows: n test images evenly spaced through the test set and, for each,
    its n nearest training images: (query images, neighbour images, query labels, neighbour labels,
    similarities), all on the CPU."""
    queries = torch.linspace(0, len(test) - 1, min(n, len(test))).long()
    index, sim = nearest(test_features[queries.to(test_features.device)], bank_features, n)
    index, sim = index.cpu(), sim.cpu()
    return stream.pictures(test, queries), stream.pictures(bank, index), test.labels[queries].tolist(), \
        bank.labels[index].numpy(), sim.numpy()


# ----------------------------------------------------------------------------- collapse

def z_moments(z):
    """(2, D) float64: the sum and the sum of squares over the batch of z / ||z||_2, from which z_std of
    one batch, or of a batch split over processes (sum the moments first), follows."""
    zn = F.normalize(z.detach().float(), dim=1).double()
    return torch.stack([zn.sum(dim=0), (zn * zn).sum(dim=0)])


def z_std_from_moments(moments, n):
    """z_std of n rows from their z_moments (..., 2, D): the unbiased per-channel std, averaged over channels."""
    s1, s2 = moments[..., 0, :], moments[..., 1, :]
    return ((s2 - s1 * s1 / n) / (n - 1)).clamp(min=0).sqrt().mean(dim=-1)


def z_std(z):
    """Per-channel std over the batch of z / ||z||_2, averaged over channels (paper Sec. 4.1, Fig. 2):
    about 1/sqrt(d) for outputs spread over the unit sphere, 0 when every output is the same vector."""
    return z_std_from_moments(z_moments(z), len(z)).float()


def first_collapse(ratio, earlier):
    """True when z_std_ratio `ratio` is under the threshold and none of the `earlier` ratios was: the epoch
    on which to warn, once."""
    return ratio < COLLAPSE_THRESHOLD and all(r >= COLLAPSE_THRESHOLD for r in earlier)
