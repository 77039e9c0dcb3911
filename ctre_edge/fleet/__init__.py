"""Fleet training: many devices train one sparse model over Flower, exchanging only sparse weights.

``wire`` (the message format), ``aggregate``, ``partition``, ``state`` and ``runner`` use numpy
and Python's own modules only; ``apps`` holds the Flower ServerApp and ClientApp and is the one
module that imports flwr (the optional extra ``fleet``). See docs/fleet.md.
"""
