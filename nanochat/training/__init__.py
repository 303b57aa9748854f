"""
The training machinery base, mid and SFT training share: configs (config), precision and compile
routes (routes), the step geometry (geometry), one optimizer step's forward/backward (step), the
out-of-memory retry with the ranks agreeing (retry), resume (resume), the metrics file (metrics), and
the two loops (train_loop for base and mid training, sft_loop for SFT), and the automatic device
batch size (batch_size/).
"""
