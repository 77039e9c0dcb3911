"""Time the exact cosine scoring layer by layer, with the float32 and the 8-bit prefilter.

Trains the network for --epochs epochs (ctre-sim), takes the activation sample as the topology
update would (S = --samples rows), and then, per layer on one thread, times the product alone
(numpy's float32 BLAS GEMM against onnxruntime's MatMulInteger on the 8-bit codes, with the
quantization of both levels) and the whole top-k search with each prefilter
(``similarity.topk_cosine_live``, the 8-bit one on levels quantized beforehand, as the topology
update has them), and counts the positions each sent to the exact rescoring.
Both searches must return the same picks. The fastest of --repeats calls each::

    python -m tools.bench_scoring --data mnist.npz [--epochs 6] [--epsilon 1] [--repeats 15]
"""

import argparse
import time

import numpy as np

from ctre_edge import evolve, kernels, similarity
from ctre_edge.packed import PackedNet
from ctre_edge.train import TrainConfig, train
from tools._common import add_update_network_args, load_update_network, machine_header


def fastest(fn, repeats):
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_update_network_args(ap)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    data, hidden = load_update_network(args)
    print(machine_header())
    print(f"data {args.data}, {data.n_features}-{'-'.join(map(str, hidden))}-{len(data.classes)}, "
          f"epsilon {args.epsilon:g}, S = {args.samples}, after {args.epochs} epochs; one thread, "
          f"fastest of {args.repeats}\n")
    config = TrainConfig(hidden=hidden, method="ctre-sim", epsilon=args.epsilon, epochs=args.epochs, lr=0.01,
                         similarity_samples=args.samples)
    model = train(data, config).model
    net = PackedNet.from_layers(model.layers)
    levels = evolve.sample_activations(net, data.X, np.arange(data.X.shape[0]), model.shift, model.scale,
                                       args.samples, np.random.default_rng(0))
    product = similarity.int8_product()
    if product is None:
        raise SystemExit("onnxruntime's 8-bit product failed its check on this machine: no 8-bit prefilter")
    print("| layer | live neurons | k | float32 GEMM ms | quantize + 8-bit product ms | float32 search ms | "
          "8-bit search ms | rescored float32 / 8-bit | same picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals = np.zeros(4)
    for l, layer in enumerate(model.layers):
        level_in, level_out = levels[l], levels[l + 1]
        k = min(evolve.drop_count(layer.nnz, config.zeta), layer.n_in * layer.n_out - layer.nnz)
        a_in, a_out = level_in.a, level_out.a
        inv_in, inv_out = level_in.inv[level_in.live], level_out.inv[level_out.live]
        codes_in, codes_out = np.empty(a_in.shape, np.int8), np.empty(a_out.shape, np.int8)
        stats_in, stats_out = np.empty((4, a_in.shape[0])), np.empty((4, a_out.shape[0]))
        dots, ints = np.empty((a_in.shape[0], a_out.shape[0]), np.float32), np.empty(
            (a_in.shape[0], a_out.shape[0]), np.int32)

        def quantized_product():
            kernels.quantize_levels(a_in, inv_in, codes_in, stats_in)
            kernels.quantize_levels(a_out, inv_out, codes_out, stats_out)
            product(codes_in.view(np.uint8), codes_out, ints)

        with similarity._blas_threads(1):
            gemm = fastest(lambda: np.matmul(a_in, a_out.T, out=dots), args.repeats)
            q8 = fastest(quantized_product, args.repeats)
            found = {}
            times = {}
            coded = (similarity.with_codes(level_in), similarity.with_codes(level_out))
            for prefilter, pair in (("float32", (level_in, level_out)), ("auto", coded)):
                def search():
                    found[prefilter] = similarity._topk_live(*pair, layer.indptr, layer.indices, k, None,
                                                             config.similarity_workspace_mib << 20, None, "levels")
                times[prefilter] = fastest(search, args.repeats)
        same = all(np.array_equal(x, y) for x, y in zip(found["float32"][:3], found["auto"][:3]))
        row = (gemm, q8, times["float32"], times["auto"])
        totals += row
        print(f"| {l} | {a_in.shape[0]} x {a_out.shape[0]} | {k} | {gemm:.2f} | {q8:.2f} | {times['float32']:.2f} | "
              f"{times['auto']:.2f} | {found['float32'][3]} / {found['auto'][3]} | {'yes' if same else 'NO'} |")
    print(f"| all | | | {totals[0]:.2f} | {totals[1]:.2f} | {totals[2]:.2f} | {totals[3]:.2f} | | |")


if __name__ == "__main__":
    main()
