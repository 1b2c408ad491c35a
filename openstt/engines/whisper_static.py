"""Whisper's decoder over a static KV cache: fixed shapes, so a decoder step can be captured once as
a CUDA graph and replayed (issue #28).

``WhisperCore`` decodes a batch of rows (greedy, sampled or beam) one token at a time; rows end and
leave the batch, and beam rows are reordered. Two interchangeable decoders keep that state:

- ``DynamicDecoder``: transformers' own decoder and ``EncoderDecoderCache``, the cache growing by
  a column per step and shrinking as rows leave (the eager path, every device);
- ``StaticDecoder``: the same arithmetic on preallocated slots. A batch of ``n`` rows takes a bucket
  of ``bucket_for(n)`` slots and the cache holds ``max_len`` columns from the start; a row that
  leaves only frees its slot, and each step runs every slot, so its shapes never change. The
  cross-attention keys and values are computed once per window. A bucket's slots are allocated
  once and reused by every batch of that size. With ``graphs`` (CUDA) each bucket's step is
  captured as a graph at its first use and replayed; a capture that fails falls back to the eager
  step with one warning.

The static decoder attends over all ``max_len`` columns with the unwritten ones masked: the same
softmax as the dynamic one (masked scores contribute exact zeros), so greedy, sampled and beam decoding
give the same tokens (``tests/test_whisper_static.py`` checks it on real weights).

``Slots`` holds which row has which slot: rows that end give theirs back, which is where rows that
join a running batch between steps will go (the next step of issue #28, so that a long window no
longer holds short ones back); today a batch's rows start together.
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

log = logging.getLogger("openstt.engines")

# Static batch sizes: a batch of n rows runs in the smallest bucket that holds it. Powers of two
# waste at most half a bucket, and seven graphs per model cover every batch up to 64 rows.
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket_for(rows: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket that holds ``rows`` rows."""
    for size in buckets:
        if rows <= size:
            return size
    raise ValueError(f"{rows} rows exceed the largest bucket ({buckets[-1]})")


class Slots:
    """Which slot of a static batch each row holds. A row takes the lowest free slot; a row that
    ends gives its slot back, and a new row may take it between two steps."""

    def __init__(self, size: int):
        self.size = size
        self._free = list(range(size))
        self.of: dict[int, int] = {}  # row -> slot

    def take(self, row: int) -> int:
        if row in self.of:
            raise ValueError(f"row {row} already holds slot {self.of[row]}")
        if not self._free:
            raise RuntimeError(f"all {self.size} slots are taken")
        slot = min(self._free)
        self._free.remove(slot)
        self.of[row] = slot
        return slot

    def release(self, row: int) -> int:
        slot = self.of.pop(row)
        self._free.append(slot)
        return slot

    @property
    def free(self) -> int:
        return len(self._free)


class DynamicDecoder:
    """transformers' decoder with its growing ``EncoderDecoderCache`` (the eager path)."""

    def __init__(self, model, encoder_states: torch.Tensor):
        self.decoder = model.model.decoder
        self.encoder_states = encoder_states
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states of every position of the rows' initial tokens: (rows, width, d_model)."""
        self.mask = mask
        return self.decoder(input_ids=tokens, attention_mask=mask, position_ids=positions,
                            encoder_hidden_states=self.encoder_states, cache=self.cache,
                            use_cache=True).last_hidden_state

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The next hidden state of each alive row, given its last token: (rows, d_model)."""
        self.mask = torch.cat([self.mask, torch.ones((len(tokens), 1), dtype=self.mask.dtype,
                                                     device=self.mask.device)], dim=1)
        return self.decoder(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=positions[:, None],
                            encoder_hidden_states=self.encoder_states, cache=self.cache,
                            use_cache=True).last_hidden_state[:, -1]

    def keep(self, alive: torch.Tensor) -> None:
        """Only the rows at these (alive) positions go on."""
        self.cache.batch_select_indices(alive)
        self.encoder_states, self.mask = self.encoder_states[alive], self.mask[alive]

    def reorder(self, source: torch.Tensor) -> None:
        """Each alive row now continues the row at ``source`` (beam search)."""
        self.cache.self_attention_cache.reorder_cache(source)  # cross-attention: a beam job's rows are alike


class SlotStorage:
    """The KV slots that every bucket's ``StaticDecoder`` of one model shares: one batch decodes at a
    time (the model service's one compute thread), so bucket ``n`` uses the first ``n`` slots. Every
    bucket up to 64 with a cache each would hold 127 rows: for large-v3 in fp16 (320 MB a row:
    32 layers x K and V x (448 + 1500 columns) x 1280 x 2 bytes) 40 GB instead of 20 GB."""

    def __init__(self, model, rows: int, max_len: int, encoder_len: int, device: torch.device, dtype: torch.dtype):
        layers = model.model.decoder.layers
        first = layers[0].self_attn
        shape = (rows, first.num_heads, max_len, first.head_dim)
        cross = (rows, first.num_heads, encoder_len, first.head_dim)
        self.rows, self.encoder_len = rows, encoder_len
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in layers]
        self.cross_keys = [torch.zeros(cross, device=device, dtype=dtype) for _ in layers]
        self.cross_values = [torch.zeros(cross, device=device, dtype=dtype) for _ in layers]
        self.written = torch.zeros((rows, max_len), dtype=torch.bool, device=device)

    @property
    def bytes(self) -> int:
        tensors = (*self.keys, *self.values, *self.cross_keys, *self.cross_values, self.written)
        return sum(t.numel() * t.element_size() for t in tensors)


class StaticDecoder:
    """Whisper's decoder on ``size`` preallocated slots (see the module's docstring), kept by the
    core per bucket and reused by every batch of that size (``start``). With ``graphs`` (CUDA), its
    step is captured as a CUDA graph at the first step and replayed from then on."""

    def __init__(self, model, size: int, max_len: int, encoder_len: int, device: torch.device,
                 dtype: torch.dtype, graphs: bool = False, storage: SlotStorage | None = None):
        decoder = model.model.decoder
        self.decoder, self.layers = decoder, decoder.layers
        self.size, self.max_len, self.device = size, max_len, device
        first = self.layers[0].self_attn
        self.heads, self.head_dim = first.num_heads, first.head_dim
        storage = storage or SlotStorage(model, size, max_len, encoder_len, device, dtype)
        if storage.rows < size:
            raise ValueError(f"{size} slots do not fit a storage of {storage.rows}")
        # views of the storage's first ``size`` slots (contiguous: slots are the leading dimension)
        self.keys = [k[:size] for k in storage.keys]
        self.values = [v[:size] for v in storage.values]
        self.cross_keys = [k[:size] for k in storage.cross_keys]
        self.cross_values = [v[:size] for v in storage.cross_values]
        self.written = storage.written[:size]  # real tokens, not padding
        self.columns = torch.arange(max_len, device=device)
        # the step's inputs, in fixed buffers (what a captured graph reads)
        self.step_tokens = torch.zeros((size, 1), dtype=torch.long, device=device)
        self.step_positions = torch.zeros((size, 1), dtype=torch.long, device=device)
        self.step_column = torch.zeros((), dtype=torch.long, device=device)
        self.step_written = torch.ones((size, 1), dtype=torch.bool, device=device)
        self.graphs = graphs
        self._graph: tuple | None = None

    def start(self, encoder_states: torch.Tensor) -> StaticDecoder:
        """Begin a batch of ``len(encoder_states)`` rows (at most ``size``), in slots 0..rows-1."""
        rows = len(encoder_states)
        self.written.zero_()
        for layer, keys, values in zip(self.layers, self.cross_keys, self.cross_values):
            keys[:rows] = self._heads(layer.encoder_attn.k_proj(encoder_states))
            values[:rows] = self._heads(layer.encoder_attn.v_proj(encoder_states))
        self.slots = Slots(self.size)
        self.alive = list(range(rows))  # the rows still decoding, in the caller's order
        self.slot_of = torch.tensor([self.slots.take(row) for row in self.alive], device=self.device)
        self.column = 0  # the next cache column to write (every row writes the same one each step)
        return self

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, column: torch.Tensor,
                written: torch.Tensor) -> torch.Tensor:
        """Every slot's hidden states for ``tokens`` (slots, T) at decoder ``positions`` (slots, T),
        written to cache columns ``column`` .. ``column + T``; ``written`` (slots, T): which of them
        are real tokens (padding is never attended to). Fixed shapes for a fixed T."""
        size, count = tokens.shape
        cols = column + self.columns[:count]  # (T,)
        self.written[:, cols] = written
        # a query at column c sees the real keys at columns <= c
        visible = self.written[:, None, :] & (self.columns[None, None, :] <= cols[None, :, None])
        bias = torch.zeros(visible.shape, dtype=self.keys[0].dtype, device=self.device)
        bias = bias.masked_fill(~visible, torch.finfo(bias.dtype).min)[:, None]  # (slots, 1, T, max_len)
        x = self.decoder.embed_tokens(tokens) + self.decoder.embed_positions.weight[positions]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            q = self._heads(attn.q_proj(h) * attn.scaling)
            self.keys[i][:, :, cols] = self._heads(attn.k_proj(h))
            self.values[i][:, :, cols] = self._heads(attn.v_proj(h))
            weights = torch.softmax(q @ self.keys[i].transpose(2, 3) + bias, dim=-1)
            x = x + attn.out_proj((weights @ self.values[i]).transpose(1, 2).reshape(size, count, -1))
            cross = layer.encoder_attn
            h = layer.encoder_attn_layer_norm(x)
            q = self._heads(cross.q_proj(h) * cross.scaling)
            weights = torch.softmax(q @ self.cross_keys[i].transpose(2, 3), dim=-1)
            x = x + cross.out_proj((weights @ self.cross_values[i]).transpose(1, 2).reshape(size, count, -1))
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        return self.decoder.layer_norm(x)

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states of every position of the rows' initial tokens: (rows, width, d_model)."""
        rows, width = tokens.shape
        full = torch.zeros((self.size, width), dtype=torch.long, device=self.device)
        full_positions = torch.zeros_like(full)
        full_mask = torch.zeros((self.size, width), dtype=torch.bool, device=self.device)
        full[:rows], full_positions[:rows], full_mask[:rows] = tokens, positions, mask.bool()
        hidden = self.forward(full, full_positions, torch.zeros((), dtype=torch.long, device=self.device),
                              full_mask)[:rows]
        self.column = width
        return hidden

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The next hidden state of each alive row, given its last token: (rows, d_model)."""
        if self.column >= self.max_len:
            raise RuntimeError(f"the static cache holds {self.max_len} tokens")
        self.step_tokens.zero_()
        self.step_positions.zero_()
        self.step_tokens[self.slot_of, 0] = tokens
        self.step_positions[self.slot_of, 0] = positions
        self.step_column.fill_(self.column)
        graph = self._captured() if self.graphs else None
        if graph is not None:
            graph[0].replay()
            hidden = graph[1][:, -1]
        else:
            hidden = self.forward(self.step_tokens, self.step_positions, self.step_column, self.step_written)[:, -1]
        self.column += 1
        return hidden[self.slot_of]

    def _captured(self) -> tuple | None:
        """This bucket's step as a CUDA graph (captured at the first step); None if capture failed."""
        if self._graph is None:
            try:
                # warm up on a side stream, the caches kept as they are, then capture
                saved = [c.clone() for c in (*self.keys, *self.values, self.written)]
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self.forward(self.step_tokens, self.step_positions, self.step_column, self.step_written)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    output = self.forward(self.step_tokens, self.step_positions, self.step_column, self.step_written)
                for cache, copy in zip((*self.keys, *self.values, self.written), saved):
                    cache.copy_(copy)
                self._graph = (graph, output)
            except Exception as exc:  # any failure: eager from now on, said once
                self.graphs = False
                log.warning("CUDA graph capture failed for %d rows (%s); decoding eagerly", self.size, exc)
                return None
        return self._graph

    def keep(self, alive: torch.Tensor) -> None:
        """Only the rows at these (alive) positions go on; the others give their slots back (their
        caches are left as they are: no shape changes)."""
        kept = [self.alive[i] for i in alive.tolist()]
        for row in set(self.alive) - set(kept):
            self.slots.release(row)
        self.alive = kept
        self.slot_of = self.slot_of[alive]

    def reorder(self, source: torch.Tensor) -> None:
        """Each alive row now continues the row at ``source`` (beam search)."""
        targets, sources = self.slot_of, self.slot_of[source]
        for cache in (*self.keys, *self.values):
            cache[targets] = cache[sources]
        self.written[targets] = self.written[sources]
