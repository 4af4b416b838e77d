"""Paired differences from dense of the RULER runs at 80 samples: per length, the mean over the 240
samples (3 subtasks x 80) of (configuration - dense) in points, a 95% bootstrap interval (4,000
resamples of the samples, seed 0) and how many samples changed score."""
import json, random, sys
import os
D = os.path.dirname(os.path.abspath(__file__)) + '/'
def load(n):
    d=json.load(open(D+f'ruler80_{n}.json'))
    return {s['id']:(s['length'], list(s['scores'].values())[0]) for s in d['samples']}
base=load('dense')
rng=random.Random(0)
for n in ('rm32','rm64fp8','exact'):
    other=load(n)
    for L in (2048,4096,6144):
        ids=[i for i in base if base[i][0]==L]
        diffs=[100*(other[i][1]-base[i][1]) for i in ids]
        m=sum(diffs)/len(diffs)
        boots=sorted(sum(rng.choice(diffs) for _ in diffs)/len(diffs) for _ in range(4000))
        print(f"{n:8s} {L//1024}K diff {m:+.2f}  95% CI [{boots[100]:+.2f}, {boots[3899]:+.2f}]  changed {sum(d!=0 for d in diffs)}/{len(diffs)}")
