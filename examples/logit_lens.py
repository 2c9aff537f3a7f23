"""The logit lens of a sentence on the embedded GPT-2: the classic table, a figure, and a frame."""

import reslens
from reslens.lens import logit_lens

model, tokenizer = reslens.load_model()
text = "When the old sailor came back to the inn, he asked for a glass of rum and sat by the fire."
lens = logit_lens(model, [text], tokenizer=tokenizer, sites=("resid", "resid_mid"))

print(lens.table(width=100))  # top-1 token per layer (rows) and position (columns)
frame = lens.to_frame()  # long form: one row per (layer, sequence, position)
resid = frame[frame.site == "resid"]
print(resid.groupby("layer")[["entropy", "kl_final_layer", "target_rank"]].median())
lens.plot(metric="rank").savefig("logit_lens.png", dpi=150, bbox_inches="tight")
print("wrote logit_lens.png")
