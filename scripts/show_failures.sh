#!/usr/bin/env bash
# Every one-line failure of the "trust at the edges" cases as a user gets it, as a markdown table: case | stderr
# lines / tracebacks | the line; and whether any hostile case created a file.
#   VAETRAIN=.venv/bin/vaetrain bash scripts/show_failures.sh
work=$(mktemp -d); cd "$work"
V=${VAETRAIN:-vaetrain}
export WANDB_MODE=offline OMP_NUM_THREADS=1
TINY="experiment=tiny trainer.max_steps=2 trainer.val_check_interval=2 trainer.enable_progress_bar=false export=null logger=csv run_dir=r"
python3 - <<'P'
import pickle, os
class P:
    def __reduce__(self): return os.system, ("touch PWNED",)
open("evil.pkl","wb").write(pickle.dumps(P(), protocol=2)); open("evil.ckpt","wb").write(pickle.dumps(P(), protocol=2))
open("empty.ckpt","wb").write(b""); open("afile","w").write(""); open("trunc.ckpt","wb").write(b"PK\x03\x04garbage")
open("foreign.ckpt","wb").write(b"not a checkpoint at all")
P
mkdir -p bad && for i in 1 2 3; do head -c 5000 /dev/urandom > bad/$i.jpg; done
case_() { local name="$1"; shift; "$V" "$@" > out.txt 2> err.txt; rc=$?
  n=$(grep -c . err.txt); last=$(grep . err.txt | tail -1); tb=$(grep -c Traceback err.txt)
  echo "| $name | rc=$rc, $n line(s), tracebacks=$tb | \`$last\` |"; }
case_ "builtins.open target" train $TINY +callbacks.x._target_=builtins.open +callbacks.x.file=CREATED +callbacks.x.mode=w
case_ "numpy.load(allow_pickle) target" train $TINY +callbacks.x._target_=numpy.load +callbacks.x.file=evil.pkl +callbacks.x.allow_pickle=true
case_ "shutil.copyfile target" train $TINY +callbacks.x._target_=shutil.copyfile +callbacks.x.src=evil.pkl +callbacks.x.dst=CREATED
case_ "torch.load(weights_only=false) target" train $TINY +callbacks.x._target_=torch.load +callbacks.x.f=evil.pkl +callbacks.x.weights_only=false
case_ "torch.load target under convert" convert evil.pkl out "source={_target_:torch.load,f:evil.pkl,weights_only:false}"
case_ "pipe: shard URL" train $TINY data=webdataset "data.shards='pipe:touch PIPED'"
case_ "trainer.max_steps=abc" train $TINY trainer.max_steps=abc
case_ "data.batch_size=abc" train $TINY data.batch_size=abc
case_ "loss.mse.weight=abc" train $TINY loss.mse.weight=abc
case_ "data.batch_size=-1" train $TINY data.batch_size=-1
case_ "+trainer.max_stepz=3" train $TINY +trainer.max_stepz=3
case_ "experiment=tiny student=finetune" train $TINY student=finetune
case_ "run_dir under a file" train $TINY run_dir=afile/run
case_ "run_dir that cannot be created" train $TINY run_dir=/sys/vaetrain/run
case_ "resume= empty file" train $TINY resume=empty.ckpt
case_ "resume= truncated zip" train $TINY resume=trunc.ckpt
case_ "resume= foreign file" train $TINY resume=foreign.ckpt
case_ "resume= hostile pickle" train $TINY resume=evil.ckpt
case_ "resume= missing file" train $TINY resume=nope.ckpt
case_ "100% corrupt image folder" train $TINY data=folder data.folder=bad
case_ "100% corrupt folder, 1 worker" train $TINY data=folder data.folder=bad data.num_workers=1
case_ "missing shard file" train $TINY data=webdataset "data.shards=missing-000.tar"
ls PWNED PIPED CREATED 2>/dev/null && echo "FILES CREATED (bad)" || echo "no PWNED/PIPED/CREATED file was created"
