"""The ShadowNet trusted app's "header": its UUID and command ids, shared with the normal-world client.

Parameters of each command (``in``/``out`` from the normal world's side):

- ``LOAD_MODEL``: [TempMemRef(secrets.sealed, in), TempMemRef(untrusted.tflite, in)] and optionally
  [Value(in: a = flags ``LOAD_VERIFY`` | ``LOAD_FAIL_WHEN_EMPTY`` | ``LOAD_WEIGHTS_OUTSIDE``, b = mask pool
  capacity, 0: default)]. The
  TA opens the secrets (sealed for this device, or provisioned to it with ``--device``), checks the
  untrusted model's SHA-256 against the one inside, parses the program and allocates every buffer once
  (with ``LOAD_VERIFY``, also the checks of every accelerator result and a copy of the obfuscated weights
  they need). A session holds one model. ``TEE_ERROR_SECURITY``: tampered, truncated, foreign or
  mismatched; ``TEE_ERROR_OUT_OF_MEMORY``. After the options value, a fourth parameter
  [TempMemRef(``manifest_digest(manifest.json)``, in)] makes the TA refuse a manifest other than the one
  converted with these secrets (``TEE_ERROR_SECURITY``; programs sealed before the digest existed skip it).
- ``BIND_SHARED_MEMORY``: [MemRef(shm, 0, size, inout)] and optionally [TempMemRef(placement, in)]: the
  TA keeps zero-copy views of the buffers, where the manifest's layout puts them (``size`` >=
  ``shared_memory_size``) or where ``encode_placement({buffer name: byte offset})`` says (every buffer
  named, 64-byte aligned, inside ``size``, no two buffers of one step overlapping;
  ``TEE_ERROR_BAD_PARAMETERS`` otherwise): the runtime places the buffers whose pages it shares with the
  accelerator's own tensors, every round's inputs in one region and outputs in another.
- ``RUN_STEP``: [Value(a=step)]: step 0 reads ``input/*`` and writes round 1's inputs; step r restores
  round r's outputs, runs the TEE's ops and writes round r + 1's inputs (or ``output/*`` for the last).
  Steps run in order, 0 to R (``TEE_ERROR_BAD_STATE`` otherwise). Step 0 takes the inference's one-time
  masks and projections from the pool: ``TEE_ERROR_NO_DATA`` when it is empty and the model was loaded
  with ``LOAD_FAIL_WHEN_EMPTY`` (else the TA makes them then). ``TEE_ERROR_MAC_INVALID``: an accelerator
  result failed verification (the inference is over; the next step must be 0).
- ``GET_STATS``: [Value(out)]: a = secure bytes this TA holds, b = the device's peak secure bytes.
- ``GET_REPORT``: [TempMemRef(nonce, in), TempMemRef(out)]: an attestation report (JSON) on a fresh
  X25519 key of this TA (provisioning by ``convert`` on this device).
- ``PROVISION``: [TempMemRef(envelope, in), TempMemRef(out)]: opens the vendor's envelope (encrypted to a
  report's key) and returns the secrets sealed for this device (what ``secrets.sealed`` holds).
- ``REFILL_POOL``: [Value(in: a = time budget in microseconds, 0: until full; b = at most this many entries,
  0: no limit), Value(out: a = ready entries, b = capacity)]: make one-time mask / projection pool entries
  (between inferences; ``tee_sim.per_inference``). A model without either answers 0, 0.
- ``BIND_WEIGHTS``: [MemRef(shm, 0, len(untrusted.tflite), in)] holding ``untrusted.tflite``, for a model
  loaded with ``LOAD_WEIGHTS_OUTSIDE``: the pool's refills read the obfuscated weights they need from it, a
  layer at a time, each checked against the Poly1305 tag taken at load under a key drawn in the TEE
  (``tee_sim.obfuscated_weights``; ``TEE_ERROR_SECURITY`` if changed).
- ``GET_POOL_STATS``: [TempMemRef(out)]: JSON: the pool (capacity, ready, bytes, entries made, offline
  seconds, entries made on the hot path) and the checks (layers, projections, worst noise ratio, achieved
  log2 bound).
"""

import enum
import hashlib
import json
import uuid
from typing import Any

UUID = uuid.UUID("5a0058b2-90b6-4dbe-9365-f4136b27e8af")


class Command(enum.IntEnum):
    LOAD_MODEL = 1
    BIND_SHARED_MEMORY = 2
    RUN_STEP = 3
    GET_STATS = 4
    GET_REPORT = 5
    PROVISION = 6
    REFILL_POOL = 7
    GET_POOL_STATS = 8
    BIND_WEIGHTS = 9


# LOAD_MODEL's option flags.
LOAD_VERIFY = 1  # check every accelerator result (Freivalds, tee_sim.freivalds)
LOAD_FAIL_WHEN_EMPTY = 2  # an inference that finds the mask pool empty fails instead of making masks then
LOAD_WEIGHTS_OUTSIDE = 4  # keep no copy of the obfuscated weights: BIND_WEIGHTS gives the normal world's
MAX_POOL_CAPACITY = 64


# secrets.sealed starts with this tag and one byte saying how its payload is protected.
SECRETS_MAGIC = b"SNS1"
SEALED = b"S"  # sealed by this device's TA (tee_sim sealing)
PROVISIONED = b"P"  # an envelope to the TA's persistent provisioning key (``--device FILE``)
# Additional authenticated data of both forms: binds the payload to its purpose.
SECRETS_AAD = b"shadownet secrets v1\x00"

# manifest.json fields outside the digest: the hashes of the files (one of them is the sealed file that holds
# the digest) and descriptions the runtime does not act on.
UNBOUND_MANIFEST_FIELDS = frozenset({"files", "created_by", "summary"})


def manifest_digest(manifest: dict[str, Any]) -> bytes:
    """SHA-256 of the manifest's other fields as canonical JSON: the converter seals it in the program and
    the runtime sends it with LOAD_MODEL, so the layout, rounds and tensors it uses are the sealed ones."""
    bound = {k: v for k, v in manifest.items() if k not in UNBOUND_MANIFEST_FIELDS}
    return hashlib.sha256(json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()).digest()


def encode_placement(offsets: dict[str, int]) -> bytes:
    """BIND_SHARED_MEMORY's placement: each shared buffer's byte offset in the shared memory."""
    return json.dumps(offsets, sort_keys=True).encode()
