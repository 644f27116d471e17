"""Run the project's audit on OUT with a given reference. With --allow-mismatch the audit's check that the
reference computes the protected model's outputs is patched out in this process only (it refuses a public
W_ref that differs from the private W); note the audit scores its estimates against the REFERENCE."""
import sys, json
import shadownet.audit as A
from shadownet.audit_report import format_report
out, ref = sys.argv[1], sys.argv[2]
if "--allow-mismatch" in sys.argv:
    A.check_outputs = lambda *a, **k: None
rep = A.audit(out, ref, inferences=None, progress=True)
print(format_report(rep))
json.dump(rep, open(sys.argv[3], "w"), indent=1, default=str)
