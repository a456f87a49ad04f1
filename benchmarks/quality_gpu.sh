#!/usr/bin/env bash
# The two GPU runs behind docs/results.md, on a GPU host, from the project root:
#   bash benchmarks/quality_gpu.sh main  [OUT]   # base, controllers 5000/512/all, random gates, LoRA, IA3, memory
#   bash benchmarks/quality_gpu.sh sweep [OUT]   # candidate defaults (+ the memory benchmark for the best one)
#   bash benchmarks/quality_gpu.sh interfere [OUT]  # levers against interference on unrelated text (issue 7)
#   bash benchmarks/quality_gpu.sh interfere62,tasks1f@1 [OUT]  # several modes side by side on one GPU (@: TASK_SEED)
# The embedded model's GGUF comes as in ../shared/tools/README.md (/tmp/carry/part-1, part-2, NAME);
# `gguf` from a wheel in .carry/mini/ when the host lacks it. Results are copied to OUT (default: $OUT).
# Then, on any machine with memory_store: python -m benchmarks.quality retrieval <run dir>, and
# python -m benchmarks.quality report <main dir> <sweep dir> --img docs/img
set -uo pipefail
what=$1
dest=${2:-${OUT:-runs/quality/out}}
if [ -f /tmp/carry/part-1 ] && [ -f /tmp/carry/part-2 ]; then
  export NTK_GGUF=/tmp/carry/$(cat /tmp/carry/NAME)
  [ -f "$NTK_GGUF" ] || cat /tmp/carry/part-1 /tmp/carry/part-2 > "$NTK_GGUF"
fi
if ! python3 -c "import gguf" 2>/dev/null; then
  pip install -q --no-deps --target /tmp/gg .carry/mini/gguf-*.whl && export PYTHONPATH=/tmp/gg
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# MODE[@TASK_SEED],...: the modes side by side on the one GPU, each in a process of its own; each mode's files go to
# OUT/MODE, its output to OUT/MODE.out. Measured in run 17 (H100, four modes): no faster than one mode after another
# (~110 s a config against ~75 s alone), and the device returns at most 8 files; it is for task draws side by side.
if [[ $what == *,* ]]; then
  mkdir -p "$dest"; pids=(); modes=()
  for spec in ${what//,/ }; do
    mode=${spec%@*}; modes+=("$mode")
    [[ $spec == *@* ]] && draw=${spec#*@} || draw=${TASK_SEED:-0}
    TASK_SEED=$draw bash "$0" "$mode" "$dest/$mode" > "$dest/$mode.out" 2>&1 & pids+=($!)
  done
  rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  for mode in "${modes[@]}"; do echo "== $mode"; tail -n 8 "$dest/$mode.out"; done
  exit $rc
fi
# TASK_SEED: another draw of the task pack (same probes), to check a result is not the seed-0 rows; each draw
# in a directory of its own, written once (under a lock: modes side by side may ask for the same draw)
seed=${TASK_SEED:-0}; tasks=runs/tasks-$seed
mkdir -p runs
flock "runs/.tasks-$seed.lock" bash -c "[ -f $tasks/manifest.json ] || python3 -m benchmarks.tasks.generate --out $tasks --seed $seed > /dev/null" || exit 1
case $what in
  main) args=(--arms ctrl-5000,lora,ia3,ctrl-512,ctrl-all,random-5000 --memory-configs ctrl-5000) ;;
  sweep) args=(--arms m0.2-lr2e-2,m0.2-lr2e-2-kl1,lr2e-2,m0.1-lr2e-2,m0.1-lr2e-2-kl1,m0.2-lr2e-2-kl5,m0.2-lr2e-2-g1000-kl1,m0.2-lr2e-2-coherent,m0.2-lr2e-2-last15,m0.2-lr2e-2-g1000,m0.2-lr2e-2-first15
               --memory-configs auto) ;;
  interfere) args=(--arms m0.2-lr2e-2-kl5,kl20-all16,kl50-all16-large,kl20-all16-large,kl50-all16,kl20,kl5-all16
                   --memory-configs none) ;;
  interfere2) args=(--arms kl20-all16-facts,kl20-all16-large,m0.2-lr2e-2-kl5,kl20-all16-facts-lr3e-2,kl10-all16-facts,kl20-all32-facts
                    --memory-configs none --rules sum) ;;
  interfere3) args=(--arms kl5-all16-facts,kl5-facts,kl10-all16-facts,kl5-all16 --memory-configs none --rules sum) ;;
  interfere4) args=(--arms kl10-all16-self,kl5-all16-self,kl20-all16-self --memory-configs none --rules sum) ;;
  interfere5) args=(--arms kl5-c1,kl5-c3,kl5-self,kl5-all16-self-c1,kl5-s1 --memory-configs none --rules sum) ;;
  interfere6) args=(--arms kl5-c1-s1,kl5-s1,kl5-c2,kl5-c0.5,kl10-c1 --memory-configs none --rules sum) ;;
  interfere7) args=(--arms kl5-c1-s2,kl5-c1,kl5-s2 --memory-configs kl5-c1 --rules sum) ;;
  interfere8) args=(--arms kl5-c1,kl10-c1 --memory-configs none --rules sum,max) ;;
  interfere9) args=(--arms m0.2-lr2e-2-kl5,kl5-c1-s1,kl5-s1 --memory-configs none --rules sum,max) ;;
  interfere10) args=(--arms kl5-c1-g2500,kl5-c1-g10000,kl5-c1-m0.1 --memory-configs none --rules sum) ;;
  interfere11) args=(--arms kl10-c1-g10000,kl20-c1-g10000,kl40-c1-g10000 --memory-configs none --rules sum) ;;
  interfere12) args=(--arms kl20-c1-g10000-s1,kl20-c1-g10000-s2 --memory-configs none --rules sum) ;;
  interfere13) args=(--arms kl5-c1-facts,kl5-c1-r8,kl20-c1-g10000-facts --memory-configs none --rules sum) ;;
  interfere14) args=(--arms kl5-c1-p5-split,kl5-c1-p5,kl5-c1-p20-split,kl5-c1-p20 --memory-configs none --rules sum) ;;
  interfere15) args=(--arms kl5-c1b-facts,kl10-c1b-facts,kl5-c1b-all16-facts,kl5-c1b-large --memory-configs none --rules sum) ;;
  interfere16) args=(--arms kl5-c1b-clauses-r8,kl5-c1-clauses-r8,kl5-c1-r8,kl5-c1 --memory-configs none --rules sum) ;;
  interfere17) args=(--arms kl5-c1b-clauses-r8-s1,kl5-c1b-clauses-r8-s2,kl5-c1-s1,kl5-c1-s2 --memory-configs none --rules sum) ;;
  memory6) args=(--arms kl5-c1b-clauses-r8 --memory-configs kl5-c1b-clauses-r8 --rules sum) ;;
  interfere18) args=(--arms kl20-c1b-clauses-r8-g10000,kl10-c1b-clauses-r8-g10000,lora --memory-configs none --rules sum) ;;
  interfere19) args=(--arms kl5-c1b-clauses-r8-wd0.5,kl5-c1b-clauses-r8-wd2,kl5-c1b-clauses-r8-first24,kl5-c1b-clauses-r8-first20
                     --memory-configs none --rules sum) ;;
  interfere20) args=(--arms kl5-c1b-clauses-r8,kl5-c1b-phrases-r12,kl5-c1b-phrases-r8,kl5-c1b-phrases-r12-s1
                     --memory-configs none --rules sum) ;;
  interfere21) args=(--arms kl5-c1b-phrases-self-r16,kl10-c1b-phrases-self-r16,kl5-c1b-clauses-self-r16,lora
                     --memory-configs none --rules sum) ;;
  interfere22) args=(--arms kl5-c1b-clauses-r8-s1,kl5-c1b-clauses-r8-s2 --memory-configs none --rules sum) ;;  # probe E, seeds 1, 2
  interfere23) args=(--arms kl5-c1b-clauses-self-r16-g10000,kl10-c1b-clauses-self-r16-g10000,kl5-c1b-clauses-self-r16-st480,kl10-c1b-clauses-self256-r16-g10000
                     --memory-configs none --rules sum) ;;  # run 8a
  interfere24) args=(--arms kl5-c1b-clauses-r8,kl10-c1b-clauses-self-r16-g10000,kl10-c1b-clauses-self-r16-g10000-s1,kl10-c1b-clauses-self-r16-g10000-s2
                     --memory-configs none --rules sum) ;;  # run 8b: with probe F
  interfere25) args=(--arms kl20-c1b-clauses-self-r16-g10000,kl10-c1b-clauses-self-r16-g15000,kl20-c1b-clauses-self-r16-g15000,lora
                     --memory-configs none --rules sum) ;;  # run 8c
  interfere26) args=(--arms kl10-c1b-clauses-selfx32-r16-g10000,kl15-c1b-clauses-self-r16-g10000,kl10-c1b-clauses-self-r16-g12000,kl10-c1b-clauses-self-r24-g10000
                     --memory-configs none --rules sum) ;;  # run 8f
  interfere27) args=(--arms kl10-c1b-clauses-selft1.5-r16-g10000,kl10-c1b-clauses-selfx32-r16-g10000-s1,kl10-c1b-clauses-selfx32-r16-g10000-s2
                     --memory-configs none --rules sum) ;;  # run 8h
  interfere28) args=(--arms default,default-open-none,default-open-vocab,default-open-generic+none
                     --memory-configs none --rules sum) ;;  # run 9a: with probe G
  interfere29) args=(--arms default-open-generic+none-s1,default-open-generic+none-s2,default-n192,default-open-generic+vocab
                     --memory-configs none --rules sum) ;;  # run 9b
  interfere30) args=(--arms default-n192-s1,default-n192-s2,default-n384,default-n384-s1
                     --memory-configs none --rules sum) ;;  # run 9c
  interfere31) args=(--arms default-n384-s2,default-n768,default-n768-s1,default-n768-s2
                     --memory-configs none --rules sum) ;;  # run 9d
  interfere32) args=(--arms default-s1,default-s2 --memory-configs none --rules sum) ;;  # run 9e: probe G, seeds 1-2
  interfere33) args=(--arms default,default-n192,default-open-generic+languages,default-open-generic+languages-s1
                     --memory-configs none --rules sum) ;;  # run 9f: with probe H
  interfere34) args=(--arms default,default-s1,default-s2 --memory-configs none --rules sum,max,overlap-mean,sign-max) ;;  # run 10a
  interfere35) args=(--arms default-c0,default-c0-s1,default-c0-s2,default-c0.5 --memory-configs none --rules sum) ;;  # run 10b
  interfere36) args=(--arms default-c2,default-c2-s1,default-c2-s2,default-c3 --memory-configs none --rules sum) ;;  # run 10c
  interfere37) args=(--arms default-last26,default-last26-s1,default-last26-s2,default-last22 --memory-configs none --rules sum) ;;  # run 10d
  interfere38) args=(--arms default-nll10,default-nll30,default-nll3,default-nll10-s1 --memory-configs none --rules sum) ;;  # run 10e
  interfere39) args=(--arms default-nll3-s1,default-nll3-s2,default-nll1,default-nll3-lang --memory-configs none --rules sum) ;;  # run 10f
  interfere40) args=(--arms default-budgets,default-budgets-s1,default-budgets-s2 --memory-configs none --rules sum) ;;  # run 10g
  interfere41) args=(--arms default-l2-1,default-l2-10,default-l2-100,default-wd0.1 --memory-configs none --rules sum) ;;  # run 11a
  interfere42) args=(--arms default-first28,default-first24,default-wd0.1-s1,default-wd0.1-s2 --memory-configs none --rules sum) ;;  # run 11b
  interfere43) args=(--arms default-first28-s1,default-first28-s2,default-first29,default-first26 --memory-configs none --rules sum) ;;  # run 11c
  interfere44) args=(--arms default-first26-s1,default-first26-s2,default-first26-wd0.1 --memory-configs none --rules sum) ;;  # run 11d
  interfere45) args=(--arms default-langtext,default-langtext-s1,default-langtext-s2,default-langtext-nll3 --memory-configs none --rules sum) ;;  # run 11e
  interfere46) args=(--arms default-longwords,default-codeswitch,default-both --memory-configs none --rules sum) ;;  # run 11f
  interfere47) args=(--arms default-both-s1,default-both-s2,default-codeswitch-s1,default-codeswitch-s2 --memory-configs none --rules sum) ;;  # run 11g
  interfere48) args=(--arms default-both,default-names,default-names-s1,default-names-s2 --memory-configs none --rules sum) ;;  # run 12a
  interfere49) args=(--arms default-both-s1,default-both-s2 --memory-configs none --rules sum) ;;  # run 12b
  interfere50) args=(--arms default-names-kl20,default-names-kl20-s1,default-names-kl20-s2,default-names-r32 --memory-configs none --rules sum) ;;  # run 12d
  interfere51) args=(--arms default-names-kl14,default-names-kl14-s1,default-names-kl14-s2,default-names-kl12 --memory-configs none --rules sum) ;;  # run 12e
  interfere52) args=(--arms default-names-kl20-lr3e-2,default-names-kl20-lr3e-2-s1,default-names-kl20-lr3e-2-s2,default-both-kl20 --memory-configs none --rules sum) ;;  # run 12f
  interfere53) args=(--arms default-names-n48 --memory-configs none --rules sum) ;;  # run 12g
  interfere54) args=(--arms default-names-n48-s2 --memory-configs none --rules sum) ;;  # run 12g, seed 2
  interfere55) args=(--arms default-both-cos,default-both-cos-s1,default-both-cos-s2,default-names-cos --memory-configs none --rules sum) ;;  # run 13a
  interfere56) args=(--arms default-both-p2,default-both-p2-s1,default-both-p2-s2,default-both-p4 --memory-configs none --rules sum) ;;  # run 13b
  interfere57) args=(--arms default-both-nll3,default-both-nll3-s1,default-both-nll3-s2,default-both-nll10 --memory-configs none --rules sum) ;;  # run 13c
  interfere58) args=(--arms default-both-s3,default-both-s4,default-both-s5 --memory-configs none --rules sum) ;;  # run 13d
  interfere59) args=(--arms default-both-nll3-s3,default-both-nll3-s4,default-both-nll3-s5 --memory-configs none --rules sum) ;;  # run 13d
  interfere60) args=(--arms default-both-nll3-row,default-both-nll3-row-s1,default-both-nll3-row-s2,default-both-nll1-row --memory-configs none --rules sum) ;;  # run 15a
  interfere61) args=(--arms default-both-nll3-row-s3,default-both-nll3-row-s4,default-both-nll3-row-s5 --memory-configs none --rules sum) ;;  # run 15b
  interfere62) args=(--arms default-both-nll3-row-cs2,default-both-nll3-row-cs2-s1 --memory-configs none --rules sum) ;;  # run 16a
  interfere63) args=(--arms default-both-nll3-row-cs3,default-both-nll3-row-cs2-s2 --memory-configs none --rules sum) ;;  # run 16a
  interfere64) args=(--arms default-both-nll3-cs2,default-both-nll3-row-cs3-s1 --memory-configs none --rules sum) ;;  # run 16a
  interfere65) args=(--arms default-both-nll3,default-both-nll3-cs2-s1 --memory-configs none --rules sum) ;;  # run 16a: the default, this GPU
  interfere66) args=(--arms default-names-nll3,default-names-nll3-s1 --memory-configs none --rules sum) ;;  # run 17: run 14b's names text, six seeds
  interfere67) args=(--arms default-names-nll3-s2,default-names-nll3-s3 --memory-configs none --rules sum) ;;  # run 17
  interfere68) args=(--arms default-names-nll3-s4,default-names-nll3-s5 --memory-configs none --rules sum) ;;  # run 17
  interfere69) args=(--arms default-names-nll3-s1,default-names-nll3-s3,default-names-nll3-s5 --memory-configs none --rules sum) ;;  # run 17: the seeds side by side left out
  interfere70) args=(--arms default-both-nll3-cs2,default-both-nll3-cs2-s1,default-both-nll3-cs2-s2,default-both-nll3-cs2-s3,default-both-nll3-cs2-s4,default-both-nll3-cs2-s5 --memory-configs none --rules sum) ;;  # run 17: code-switch x2, text hinge, six seeds
  tasks1e) args=(--arms default-both-nll3-row,default-both-nll3-row-s1,default-both-nll3-row-s2 --memory-configs none --rules sum) ;;  # run 15c, with TASK_SEED=1
  tasks2b) args=(--arms default-both-nll3-row,default-both-nll3-row-s1,default-both-nll3-row-s2 --memory-configs none --rules sum) ;;  # run 15c, with TASK_SEED=2
  memory15) args=(--arms default-both-nll3-row --memory-configs default-both-nll3-row --rules sum) ;;  # run 15d: the row hinge, memory benchmark
  tasks1c) args=(--arms default,default-both,default-names --memory-configs none --rules sum) ;;  # run 12c, with TASK_SEED=1
  memory11) args=(--arms library --memory-configs library --rules sum) ;;  # run 11h: the run-11 library default, memory benchmark
  memory13) args=(--arms library --memory-configs library --rules sum) ;;  # run 13f: the run-13 library default, memory benchmark
  memory8) args=(--arms default --memory-configs default --rules sum) ;;  # run 8d: the adopted default, memory benchmark
  tasks1b) args=(--arms default,kl5-c1b-clauses-r8 --memory-configs none --rules sum) ;;  # run 8e, with TASK_SEED=1
  tasks1d) args=(--arms default-both-nll3,default-both-nll3-s1,default-both-nll3-s2,default-both-s1 --memory-configs none --rules sum) ;;  # run 13e, with TASK_SEED=1
  tasks2) args=(--arms default-both-nll3,default-both-nll3-s1,default-both-nll3-s2,default-both --memory-configs none --rules sum) ;;  # run 13g, with TASK_SEED=2
  tasks1) args=(--arms kl5-c1,kl5-c1b-clauses-r8 --memory-configs none --rules sum) ;;  # with TASK_SEED=1
  fix) args=(--arms ctrl-5000,m0.2-lr2e-2-kl5,lora,m0.2-lr2e-2 --memory-configs m0.2-lr2e-2-kl5,ctrl-5000) ;;
  *) echo "usage: $0 MODE[@TASK_SEED][,MODE...] [OUT]: MODE one of the labels above"  >&2; exit 2 ;;
esac
# the tokenizer files of a local cache (.carry/tok): transformers versions differ in the EOS they give the GGUF
[ -d .carry/tok ] && args+=(--tokenizer .carry/tok)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout "${QUALITY_TIMEOUT:-545}" python3 -m benchmarks.quality run --tasks "$tasks" --out runs/quality --name "$what" \
  --quiet --time-budget "${QUALITY_BUDGET:-470}" "${args[@]}"
rc=$?
mkdir -p "$dest"
cp runs/quality/"$what"/{results.json,log.txt} "$dest"/ 2>/dev/null
cp runs/quality/"$what"/controllers.zip "$dest"/ 2>/dev/null
exit $rc
