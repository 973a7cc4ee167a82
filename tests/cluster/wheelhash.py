"""Print a short content hash of a wheel (member names and bytes, not zip timestamps) plus the
set of dependency wheels available next to it, so the worker image is rebuilt exactly when
the installed content would change.   python wheelhash.py PROJECT.whl WHEELHOUSE SALT"""
import hashlib
import os
import sys
import zipfile

whl, wheelhouse, salt = sys.argv[1:4]
h = hashlib.sha256(salt.encode())
with zipfile.ZipFile(whl) as z:
    for name in sorted(z.namelist()):
        h.update(name.encode() + b"\0" + hashlib.sha256(z.read(name)).digest())
for name in sorted(os.listdir(wheelhouse)):
    if name.endswith(".whl") and not name.startswith("runnable_k8s-"):
        h.update(b"dep:" + name.encode())
print(h.hexdigest()[:16])
