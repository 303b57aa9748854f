"""
The automatic device batch size: find the largest per-device batch that trains without running out
of memory with a safety margin of the device's memory left over, and keep the configured total batch
(tokens per optimizer step) exact by trying only device batches that divide it; gradient
accumulation makes up the rest.

How it searches:
- A trial is one real training step (the training's own forward/backward with full logits, backward,
  optimizer step with its state allocated) on the real model, at the stage's sequence length, autocast
  (bf16 on cuda) and compile setting. Weights are snapshotted to CPU before and restored after every
  trial, and the trial's optimizers are fresh ones from `optimizers_factory`, so the caller's model and
  optimizers end exactly as they were.
- The margin is applied to bytes: every trial runs with only (1 - safety_margin) of the device's memory
  available (CUDA: torch.cuda.set_per_process_memory_fraction, so the caching allocator's own
  out-of-memory error stops a trial that needs more, fragmentation and workspaces included; CPU: the
  budget child's address-space limit). The size kept is the largest divisor of the rows per rank
  R = total_batch / (seq_len * world_size) whose trial passes. Each trial records its measured peak.
- Only divisors of R are tried: growth (each next size the smallest divisor at least twice the last,
  up to R), then a binary search over the divisors between the last pass and the first failure.
- When the training compiles, the trials step the training's compiled module (SearchOptions.compiled),
  so the search measures the compiled step and its graphs serve the training that follows: with dynamo's default dynamic setting a graph for the first size and one with a symbolic batch size
  for every other, the training's size included. A training compiled with dynamic=False (SFT) searches
  eager and confirms the chosen size with one compiled step, again on the training's own module.
- The speed check (stop_gain; eager training only): the baseline and the next smaller divisor are
  timed in interleaved rounds; the smaller is kept only when every round of it beats every round of
  the baseline by stop_gain, and never when one size's timings disagree by more than NOISE_LIMIT
  (a contended machine). The timings go into the cache entry; a size below the baseline expires.
- time_limit_s: no trial starts that would overrun it; the best size found so far is kept.
- With several ranks, every rank runs every trial and the verdicts are reduced (MIN on success,
  MAX on step time and peak) in one collective per trial that every rank reaches whatever its outcome,
  so a rank that runs out of memory cannot deadlock the others and all ranks agree.
- On CPU the search runs under a real memory budget in a spawned child process: after importing
  torch and warming up its thread pools, the child measures its address-space size (VmSize) and
  sets RLIMIT_AS to that baseline plus (1 - safety_margin) x the budget. The budget is therefore the
  address space the training step may add on top of the torch runtime (model, optimizer state,
  activations, logits); an allocation beyond it fails with the CPU allocator's real error. Address
  space bounds resident memory from above, so a size found this way also stays within it in RSS.

Results are cached per sha256 digest of everything that changes memory, one JSON file per key in
a shared folder (default <base_dir>/batch_size_cache), written atomically under a file lock.
If a real training step still runs out of memory, fallback_after_oom() halves the device batch,
multiplies gradient accumulation to keep the total exact, and records the smaller size in the cache.

The package, one seam a module: oom (which errors are an allocation failure), trial (one trial step),
search (the search and the speed check), budget (the CPU memory-budget child), cache (the JSON
entries), options (SearchOptions: what resolve is asked with) and resolve (training_options,
key_inputs, resolve, fallback_after_oom). The divisor maths is training.geometry's.
"""
