"""Process groups (``dist``), the Communicator interface and exact all-reduce (``communicator``),
and the quantized collectives (``collectives``: gather and two-shot, codec injected)."""
