"""Time capture + fit of one text on SmolLM2-135M (30 layers x 9 heads, 1024 tokens): PYTHONPATH=src python benchmarks/time_fit_smollm2.py"""
import time, sysconfig, os, torch
from attnmask import models
from attnmask.fitting import Calibration, FAMILIES
t=time.perf_counter(); model, tok = models.load("smollm2"); print("load", round(time.perf_counter()-t,1))
for name in ("shlex.py", "textwrap.py"):
    ids = tok(open(os.path.join(sysconfig.get_paths()["stdlib"], name)).read(), return_tensors="pt").input_ids[0][:1024]
    t=time.perf_counter(); maps = models.capture(model, ids); t1=time.perf_counter()
    cal = Calibration(); cal.add(maps); t2=time.perf_counter(); cal.plan(0.95); t3=time.perf_counter()
    calall = Calibration(families=FAMILIES); calall.add(maps); t4=time.perf_counter()
    print(name, "capture", round(t1-t,1), "stats(default)", round(t2-t1,1), "plan", round(t3-t2,1), "total", round(t3-t,1), "| stats(all five families)", round(t4-t3,1))
    del maps
