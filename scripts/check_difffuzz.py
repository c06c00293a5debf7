#!/usr/bin/env python3
# Differential fuzzing of qcow2-check against qemu-img check (not run in CI).
#
# Makes small images of several kinds with qemu-img/qemu-io (plain, 4 KiB
# clusters, 1- and 64-bit refcounts, extended L2, v2, lazy refcounts,
# bitmaps; most with a snapshot), flips words in their metadata, and
# compares plain checks (JSON, exit code, stderr) and -r leaks / -r all
# (JSON, exit code, then qemu-img's re-check of both results). Mismatches
# are saved as fail-SEED-ITER-MODE.qcow2 in the current directory; known,
# documented divergences (where qemu-img's repair fails or drops snapshots)
# are printed as KNOWN.
#
# Usage: cd SCRATCH && python3 scripts/check_difffuzz.py SEED ITERATIONS [QCOW2_CHECK]
import subprocess, random, struct, shutil, json, sys, os
OURS=os.path.abspath(sys.argv[3]) if len(sys.argv)>3 else os.path.join(os.path.dirname(os.path.abspath(__file__)),'..','target','debug','qcow2-check')
os.makedirs('q',exist_ok=True); os.makedirs('o',exist_ok=True)
def run(cmd):
    p=subprocess.run(cmd,capture_output=True,text=True)
    return p.returncode,p.stdout,p.stderr
def mk(kind):
    for f in ['a.qcow2']:
        if os.path.exists(f): os.remove(f)
    opts={'bm':'cluster_size=65536','plain':'cluster_size=65536','small':'cluster_size=4096','rc1':'refcount_bits=1','rc64':'refcount_bits=64,cluster_size=1024','ext':'extended_l2=on','v2':'compat=0.10','lazy':'lazy_refcounts=on'}[kind]
    run(['qemu-img','create','-q','-f','qcow2','-o',opts,'a.qcow2','32M'])
    if kind=='bm':
        run(['qemu-img','bitmap','--add','a.qcow2','b0']); run(['qemu-img','bitmap','--add','-g','512','a.qcow2','b1'])
    cmds=['write -P 1 0 1M','write -c -P 2 2M 128k','write -P 3 9M 64k']
    if kind=='ext': cmds.append('write -P 4 20M 8k')
    run(['qemu-io']+sum([['-c',c] for c in cmds],[])+['a.qcow2'])
    if kind not in ('rc1',):
        run(['qemu-img','snapshot','-c','s1','a.qcow2'])
        run(['qemu-io','-c','write -P 5 0 128k','-c','write -P 6 9M 4k','a.qcow2'])
    shutil.copy('a.qcow2','base.qcow2')
def meta_offsets(data):
    cb=struct.unpack('>I',data[20:24])[0]; cs=1<<cb
    l1=struct.unpack('>Q',data[40:48])[0]; l1s=struct.unpack('>I',data[36:40])[0]
    rt=struct.unpack('>Q',data[48:56])[0]
    so=struct.unpack('>Q',data[64:72])[0]
    regions=[(0,120),(l1,l1s*8),(rt,64),(so,200)]
    for i in range(l1s):
        e=struct.unpack('>Q',data[l1+8*i:l1+8*i+8])[0]&0x00fffffffffffe00
        if e and e+cs<=len(data): regions.append((e,cs))
    r0=struct.unpack('>Q',data[rt:rt+8])[0]&~0x1ff
    if r0 and r0+cs<=len(data): regions.append((r0,cs))
    return regions
seed=int(sys.argv[1]); n=int(sys.argv[2])
random.seed(seed)
bad=0
for it in range(n):
    kind=random.choice(['bm','plain','small','rc1','rc64','ext','v2','lazy'])
    mk(kind)
    data=bytearray(open('base.qcow2','rb').read())
    regs=meta_offsets(data)
    for _ in range(random.randint(1,3)):
        off,ln=random.choice(regs)
        if ln<=0: continue
        p=off+random.randrange(ln)
        # favour 8-byte aligned word tweaks
        p&=~7
        if p+8>len(data): continue
        w=struct.unpack('>Q',data[p:p+8])[0]
        mode=random.randrange(5)
        if mode==0: w^=1<<random.randrange(64)
        elif mode==1: w=0
        elif mode==2: w=(w&0xff000000000001ff)|(random.randrange(len(data)//512+64)*512)
        elif mode==3: w=w+random.choice([1,-1,2])*(1<<cb if False else 1) if False else w^(1<<random.randrange(9,30))
        else: w=random.getrandbits(64)
        data[p:p+8]=struct.pack('>Q',w&0xffffffffffffffff)
    if random.random()<0.1: data=data[:random.randrange(len(data)//2,len(data))]
    open('q/x.qcow2','wb').write(data); open('o/x.qcow2','wb').write(data)
    for rep in [None,'leaks','all']:
        open('q/x.qcow2','wb').write(data); open('o/x.qcow2','wb').write(data)
        a=['--output','json']+(['-r',rep] if rep else [])
        qc,qo,qe=run(['qemu-img','check']+a+['q/x.qcow2'])
        oc,oo,oe=run([OURS]+a+['o/x.qcow2'])
        qe=qe.replace('qemu-img:','qcow2-check:').replace('qemu-img check','qcow2-check').replace('q/x.qcow2','o/x.qcow2')
        def norm(s):
            try:
                j=json.loads(s); j.pop('filename',None)
                if rep: j.pop('image-end-offset',None)
                return j
            except Exception: return s
        ok = qc==oc and norm(qo)==norm(oo) and (rep or qe==oe)
        if rep and ok:
            r1=run(['qemu-img','check','--output','json','q/x.qcow2']); r2=run(['qemu-img','check','--output','json','o/x.qcow2'])
            def cnt(s):
                try:
                    j=json.loads(s); return (j.get('corruptions',0),j.get('leaks',0),j.get('check-errors'))
                except Exception: return s
            ok = r1[0]==r2[0] and cnt(r1[1])==cnt(r2[1])
        ver=struct.unpack('>I',data[4:8])[0]
        odd_autoclear = ver>=3 and len(data)>=96 and struct.unpack('>Q',data[88:96])[0] & ~3 and struct.unpack('>I',data[60:64])[0]
        bm_snap = kind=='bm' and len(data)>=96 and struct.unpack('>Q',data[88:96])[0] & 1 and struct.unpack('>I',data[60:64])[0]
        if not ok and rep and bm_snap:
            print('KNOWN bitmaps+snapshots: qemu drops the snapshots', it, kind); ok=True
        if not ok and rep and odd_autoclear:
            print('KNOWN unknown autoclear bits: qemu drops the snapshots', it, kind); ok=True
        if not ok and rep and 'Marking image as corrupt' in qe:
            r2=run(['qemu-img','check','--output','json','o/x.qcow2'])
            print('KNOWN qemu repair fails, ours', oc, 'recheck', r2[0], it, kind)
            ok=True
        if not ok:
            bad+=1
            tag=f'fail-{seed}-{it}-{rep}'
            open(tag+'.qcow2','wb').write(data)
            print('MISMATCH',tag,kind,'qemu',qc,'ours',oc)
            print(' q:',qo[:300].replace('\n',' '),qe[:300].replace('\n','|'))
            print(' o:',oo[:300].replace('\n',' '),oe[:300].replace('\n','|'))
            break
        if rep is None:
            open('q/x.qcow2','wb').write(data); open('o/x.qcow2','wb').write(data)
print('done',n,'bad',bad)
