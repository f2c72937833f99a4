"""benchmarks/report.py: every phase's row, the parts, the decoders, the targets and the peers
are printed; the phases not measured say why."""

from test_benchmarks_run import phase_outputs

from benchmarks import report, run


def summary(peers=None):
    a = run.parse_args(["--bf16", "never", "--threads", "2", "--repeats", "1"])
    enc, unc, cac, inf, dec = phase_outputs()
    r = run.summarize(a, enc, unc, cac, inf, dec, peers or {})
    r["wall_s"] = 12.0
    phases = {"train_uncached": unc, "train_cached": cac, "infer": inf, "decoder": dec}
    return report.format_report(r, phases, 2, 1, "never", reference_nuclei=16)


def test_every_row_and_line_is_printed():
    text = summary()
    lines = text.splitlines()
    assert lines[0].startswith("DES-SAM CPU benchmark: ViT-B random weights, 1024^2, 2 threads")
    assert lines[1] == "| phase | seconds | x encoder | peak RSS GB |"
    assert "| encoder forward (no grad) | 4.00 | 1.00 | 2.00 |" in lines
    assert "| train step, cached embedding | 6.00 | 1.50 | 2.50 |" in lines
    assert "| inference, 500 nuclei | 10.00 | 2.50 | 2.50 |" in lines
    assert "| inference, 100 nuclei, bfloat16 decoder | 5.00 | 1.25 | |" in lines
    assert (
        "| inference, 100 nuclei, bfloat16 end to end | not measured (--bf16 never) | | |" in lines
    )
    assert "| encoder forward, int8 | 2.00 | 0.50 | |" in lines
    assert "| SAM decoder, ms per nucleus | 10.0 | | |" in lines
    assert "prototype" not in text.lower()  # the first prototype's figures are gone
    assert "Training step parts (s): uncached embeddings 2.00" in text
    assert "cached backward 3.00, cached backward_mask 1.25, cached backward_detector 1.75" in text
    assert "infer_500 parts (s): encoder 4.00, mask_decoder 5.50, rest 0.50" in lines
    assert "Decoder ms per nucleus: fast_fp32 10.0, fast_bf16 5.0, reference 30.0" in lines
    assert "Decoder reference, ms per nucleus: total 30.0" in lines
    assert "float16 cache, relative change of the first step's losses: loss_cls 1.0e-03" in text
    assert "Targets (x encoder): cached train step 1.50 <= 1.5 met, inference 100 1.50" in text
    assert "inference 500 2.50 <= 3.0 met, peak RSS 500 / encoder 1.25 <= 1.5 met" in text
    assert "segment-anything's predictor" not in text
    assert lines[-1] == "Total benchmark wall time 12 s"


def test_the_peers_lines():
    text = summary({"sam_predictor_100_s": 12.0, "sam_predictor_100_rss_gb": 6.0})
    assert "over segment-anything's predictor with 100 boxes (12.00 s):" in text
    assert "  DES-SAM float32, 100 nuclei: 6.00 s, 0.50x" in text
    assert "  segment-anything predictor, 100 boxes: 12.00 s, 1.00x, peak RSS 6.00 GB" in text
    assert "same precision (target <= 0.7): float32 0.50x" in text
    assert "bfloat16" not in text.split("same precision")[1]  # the bfloat16 pair did not run
    text = summary({"sam_predictor_100_s": 12.0, "sam_predictor_100_bf16_s": 8.0})
    assert "  segment-anything predictor, 100 boxes, bfloat16 autocast: 8.00 s, 0.67x" in text
