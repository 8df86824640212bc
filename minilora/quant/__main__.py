"""`python -m minilora.quant`: print the quantization report (same as `minilora quantize-report`)."""
import sys

from minilora.quant.report import main

sys.exit(main(sys.argv[1:]))
