//! Hostile page tables and bus addresses: tables that point at themselves, at garbage, outside RAM at every level and size, and random tables against the reference walker; faults, never a panic.

use super::*;

#[test]
fn fault_outside_ram_table_pointer_is_a_walk_fault_with_the_table_address() {
    let mut d = setup();
    d.map_new(DOM, SRC, 4096, PAGE_4K, RW);
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.plant(dst, 4096);
    // The level-2 entry above SRC points at a level-1 table outside bus memory.
    d.set_pte(DOM, SRC, 2, OUTSIDE | RW);
    let c = d.run(Q, Desc::copy(SRC + 8, DST, 64));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_PAGE_WALK,
        SRC + 8,
        0,
    );
    let r = d.wait_faults(1);
    assert_rec(
        &r[0],
        FAULT_OUTSIDE_RAM,
        ACCESS_PAGE_WALK,
        DOM,
        Q,
        SRC + 8,
        0,
    );
    assert_eq!(r[0].info, OUTSIDE, "the table's bus address");
    assert_eq!(r[0].level, 1, "the table that could not be read");
    // The largest address an entry can hold.
    let top = 0x000f_ffff_ffff_f000;
    d.set_pte(DOM, DST, 3, top | RW);
    let c = d.run(Q, Desc::fill(DST, 8, 0));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE | ACCESS_PAGE_WALK,
        DST,
        0,
    );
    let r = d.wait_faults(1);
    assert_eq!((r[0].info, r[0].level), (top, 2));
    d.bus.check_canaries();
}

#[test]
fn fault_outside_ram_page_is_never_accessed() {
    let mut d = setup();
    let src = d.map_new(DOM, SRC, 4096, PAGE_4K, RW);
    d.bus.write(src, &pattern(18, 4096));
    // The destination leaf points below bus memory, the source's second page above it.
    d.map(DOM, DST, OUTSIDE, 4096, PAGE_4K, RW);
    d.map(DOM, SRC + 4096, RAM_END, 4096, PAGE_4K, RW);
    let c = d.run(Q, Desc::copy(SRC, DST, 64));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        DST,
        0,
    );
    let c = d.run(Q, Desc::crc32c(SRC, 8192));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_OUTSIDE_RAM, 0, SRC + 4096, 4096);
    let r = d.wait_faults(2);
    assert_rec(&r[0], FAULT_OUTSIDE_RAM, ACCESS_WRITE, DOM, Q, DST, 0);
    assert_eq!(
        (r[0].info, r[0].level),
        (OUTSIDE, 0),
        "the bus address, not in a walk"
    );
    assert_rec(&r[1], FAULT_OUTSIDE_RAM, 0, DOM, Q, SRC + 4096, 1);
    assert_eq!((r[1].info, r[1].level), (RAM_END, 0));
    // A 2 MiB leaf just past the end of RAM.
    d.map(DOM, LARGE, RAM_END, PAGE_2M, PAGE_2M, RW);
    let c = d.run(Q, Desc::fill(LARGE + PAGE_2M - 8, 8, 0));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        LARGE + PAGE_2M - 8,
        0,
    );
    let r = d.wait_faults(1);
    assert_eq!(r[0].info, RAM_END + PAGE_2M - 8);
    d.bus.check_canaries();
}

#[test]
fn hostile_table_pointing_at_itself_maps_itself_and_cannot_loop() {
    let mut d = setup();
    let root = d.pt(DOM).root;
    // root[1] points at the root: walking L4 index 1, L3 index 1, L2 index 1, L1 index 1
    // reuses the root at every level and ends in the root page itself.
    d.bus.write_u64(root + 8, root | RW);
    let me = HOSTILE | (1 << 30) | (1 << 21) | (1 << 12);
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.plant(dst + 16, 48);
    d.bus.plant(dst + 72, 4096 - 72);
    let c = d.run(Q, Desc::copy(me, DST, 16));
    assert_ok(&c, 16);
    assert_eq!(
        d.bus.read(dst, 16),
        d.bus.read(root, 16),
        "the root page's bytes"
    );
    assert_eq!(d.bus.read_u64(dst + 8), root | RW);
    // Index 2 at level 1 is empty: not present, at level 1.
    let c = d.run(Q, Desc::crc32c(me + 4096, 8));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_NOT_PRESENT, 0, me + 4096, 0);
    // A self pointer with PS at level 4 is malformed.
    d.bus.write_u64(root + 3 * 8, root | RW | PTE_PS);
    let c = d.run(Q, Desc::crc32c(3 << 39, 8));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_MALFORMED_ENTRY, 0, 3 << 39, 0);
    // An L1 entry pointing at its own table.
    let l1 = d.pte_addr(DOM, HOSTILE | (2 << 30), 1) & !0xfff;
    d.bus.write_u64(l1, l1 | PTE_R);
    let c = d.run(Q, Desc::copy(HOSTILE | (2 << 30), DST + 64, 8));
    assert_ok(&c, 8);
    assert_eq!(d.bus.read_u64(dst + 64), l1 | PTE_R);
    let r = d.wait_faults(2);
    assert_eq!((r[0].reason, r[0].level), (FAULT_NOT_PRESENT, 1));
    assert_eq!(
        (r[1].reason, r[1].level, r[1].info),
        (FAULT_MALFORMED_ENTRY, 4, root | RW | PTE_PS)
    );
    d.bus.check_canaries();
}

#[test]
fn hostile_entries_pointing_outside_ram_fault_at_every_level_and_size() {
    let mut d = setup();
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.plant(dst, 4096);
    let outside = [
        0u64,
        0x1000,
        RAM_BASE - PAGE_4K,
        RAM_END,
        RAM_END + 2 * PAGE_1G,
        0x000f_ffff_ffe0_0000,
    ];
    let root = d.pt(DOM).root;
    let mut seq = 0;
    let mut expect = |d: &mut Driver, iova: u64, access: u8, info: u64, level: u32| {
        let c = d.run(Q, Desc::copy(iova, DST, 8));
        assert_cpl(&c, STATUS_DMA_ERROR, FAULT_OUTSIDE_RAM, access, iova, 0);
        let r = d.wait_faults(1);
        assert_rec(&r[0], FAULT_OUTSIDE_RAM, access, DOM, Q, iova, seq);
        assert_eq!((r[0].info, r[0].level), (info, level), "{r:x?}");
        seq += 1;
    };
    for (i, &bad) in outside.iter().enumerate() {
        // As a table pointer at levels 4, 3 and 2: the table below cannot be read.
        let iova = (2 + i as u64) << 39;
        d.bus.write_u64(root + (2 + i as u64) * 8, bad | RW);
        expect(&mut d, iova + 0x40, ACCESS_PAGE_WALK, bad, 3);
        let region = |k: u64| HOSTILE + (4 * i as u64 + k) * PAGE_1G;
        d.set_pte(DOM, region(0), 3, bad | RW);
        expect(&mut d, region(0) + 0x123, ACCESS_PAGE_WALK, bad, 2);
        d.set_pte(DOM, region(1), 2, bad | RW);
        expect(&mut d, region(1) + 0x40, ACCESS_PAGE_WALK, bad, 1);
        // As a leaf of each size: a fault when the access happens, not in the walk.
        d.set_pte(DOM, region(2), 1, bad | RW);
        expect(&mut d, region(2) + 8, 0, bad + 8, 0);
        let big = bad & !(PAGE_2M - 1);
        d.set_pte(DOM, region(3), 2, big | RW | PTE_PS);
        expect(&mut d, region(3) + 0x1000, 0, big + 0x1000, 0);
    }
    // 1 GiB leaves outside RAM.
    for (k, bad) in [RAM_END, RAM_END + 2 * PAGE_1G, 0].into_iter().enumerate() {
        let iova = HOSTILE + (100 + k as u64) * PAGE_1G;
        d.set_pte(DOM, iova, 3, bad | RW | PTE_PS);
        expect(&mut d, iova + 0x3000_0000, 0, bad + 0x3000_0000, 0);
    }
    d.bus.check_canaries();
}

#[test]
fn hostile_garbage_roots_halt_the_fetch_with_the_modelled_fault() {
    let mut d = Driver::new();
    d.enable_fault_log(64);
    let mut rng = Rng::new(0x9a5b);
    let mut seq = 0;
    for round in 0..24 {
        // A root page of pure garbage, no structure at all.
        let root = d.bus.alloc(4096, PAGE_4K);
        let garbage: Vec<u8> = (0..512)
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect();
        d.bus.write(root, &garbage);
        d.set_domain(5, root | (rng.next_u64() & 0xfff), DOMAIN_MODE_TRANSLATED);
        assert_eq!(d.invalidate_domain(5), 0);
        d.setup_queue_with(1, 5, 8, 0);
        let ring = d.queue(1).ring;
        d.submit(1, Desc::nop());
        let want = model_walk(&d.bus, root, ring, false, 48);
        match want {
            Err(f) => {
                d.wait_status(1, "queue halt", |s| s & Q_STATUS_ERROR != 0);
                assert_eq!(d.qread(1, Q_HALT_REASON), HALT_DESC_FETCH, "round {round}");
                let r = d.wait_faults(1);
                let access = ACCESS_DESCRIPTOR | if f.walk_read { ACCESS_PAGE_WALK } else { 0 };
                assert_rec(&r[0], f.reason, access, 5, 1, ring, seq);
                assert_eq!((r[0].level, r[0].info), (f.level, f.info), "round {round}");
                seq += 1;
            }
            Ok(_) => {
                // The garbage happened to map the ring somewhere in RAM: any answer but a
                // panic is fine; stop the queue.
            }
        }
        d.qwrite(1, Q_CTRL, 0);
    }
}

#[test]
fn hostile_random_tables_fuzz_gives_modelled_faults_never_a_panic() {
    const ROUNDS: usize = 12;
    const READS: usize = 220;
    const WRITES: usize = 120;
    let mut d = Driver::new();
    d.enable_fault_log(FAULT_LOG_MAX);
    let root = d.translated_domain(DOM);
    d.setup_queue(Q, DOM, 256);
    let sandbox = d.bus.alloc_guarded(16 << 20, PAGE_2M);
    let tables: Vec<u64> = (0..24).map(|i| sandbox + i * PAGE_4K).collect();
    d.bus.write(sandbox, &pattern(22, 16 << 20));
    let mut rng = Rng::new(0xf022_2024);
    let mut seq = 0u32;
    let mut faults_total = 0u32;
    let mut modelled = [0usize; 8];
    for round in 0..ROUNDS {
        randomize_tables(&mut d, &mut rng, root, &tables, sandbox);
        assert_eq!(d.invalidate_domain(DOM), 0);

        // Read phase: CRC32C only, so the tables cannot change; the model predicts all.
        let descs: Vec<Desc> = (0..READS)
            .map(|i| {
                let src = if rng.chance(1, 30) {
                    (1u64 << 48) + rng.below(1 << 40)
                } else {
                    random_hostile_iova(&mut rng)
                };
                let len = 1 + rng.below(3 * 4096) as u32;
                Desc::crc32c(src, len).tag((round as u64) << 32 | i as u64)
            })
            .collect();
        let models: Vec<ModelRead> = descs
            .iter()
            .map(|x| model_read(&d.bus, root, x.src, u64::from(x.len), 48))
            .collect();
        let ts = d.submit_many(Q, &descs);
        let mut want_faults = Vec::new();
        for ((t, desc), model) in ts.iter().zip(&descs).zip(&models) {
            let c = d.wait(t);
            match model {
                ModelRead::Ok(data) => {
                    modelled[0] += 1;
                    assert_ok(&c, desc.len);
                    assert_eq!(c.result, u64::from(crc32c(data)), "{desc:x?}");
                }
                ModelRead::Fault { bytes, iova, fault } => {
                    modelled[fault.reason as usize] += 1;
                    let access = if fault.walk_read { ACCESS_PAGE_WALK } else { 0 };
                    let reason_ok = c.fault_reason == fault.reason
                        || (fault.perm_ambiguous && c.fault_reason == FAULT_PERMISSION);
                    assert!(
                        c.status == STATUS_DMA_ERROR
                            && reason_ok
                            && c.fault_access == access
                            && c.fault_addr == *iova
                            && u64::from(c.bytes) == *bytes,
                        "{desc:x?}: device {c:x?}, model {model:x?}"
                    );
                    want_faults.push((c.fault_reason, *iova, *fault));
                }
            }
        }
        let recs = d.wait_faults(want_faults.len() as u32);
        assert_eq!(recs.len(), want_faults.len());
        for (r, (reason, iova, f)) in recs.iter().zip(&want_faults) {
            let access = if f.walk_read { ACCESS_PAGE_WALK } else { 0 };
            assert_rec(r, *reason, access, DOM, Q, *iova, seq);
            if *reason == f.reason && matches!(f.reason, FAULT_MALFORMED_ENTRY | FAULT_OUTSIDE_RAM)
            {
                assert_eq!((r.info, r.level), (f.info, f.level), "{r:x?} vs {f:x?}");
            }
            seq += 1;
        }
        faults_total += want_faults.len() as u32;

        // Write phase: anything goes, including malformed descriptors; the tables may be
        // overwritten by the device itself. Only sanity is checked.
        let errors_before = d.qread(Q, Q_ERRORS);
        let count_before = d.read(REG_FLOG_COUNT);
        let descs: Vec<Desc> = (0..WRITES)
            .map(|i| {
                let len = match rng.below(10) {
                    0 => 0,
                    1 => MAX_XFER + 1,
                    _ => 1 + rng.below(2 * 4096) as u32,
                };
                let (a, b) = (random_hostile_iova(&mut rng), random_hostile_iova(&mut rng));
                let mut x = match rng.below(6) {
                    0 | 1 => Desc::copy(a, b, len),
                    2 => Desc::fill(b, len, rng.next_u64()),
                    3 => Desc::compare(a, b, len),
                    4 => Desc::crc32c(a, len),
                    _ => Desc {
                        opcode: rng.below(256) as u8,
                        len,
                        src: a,
                        dst: b,
                        ..Desc::default()
                    },
                };
                if rng.chance(1, 20) {
                    x.flags = rng.below(256) as u8;
                }
                if rng.chance(1, 30) {
                    x.reserved[rng.below(24) as usize] = 1;
                }
                if rng.chance(1, 10) {
                    x.cpl = Cpl::None;
                }
                x.tag((round as u64) << 32 | 0x8000_0000 | i as u64)
            })
            .collect();
        let ts = d.submit_many(Q, &descs);
        let fence = d.submit(Q, Desc::nop());
        assert_ok(&d.wait(&fence), 0);
        for (t, x) in ts.iter().zip(&descs) {
            if t.cpl_bus.is_none() {
                continue;
            }
            let c = d.wait(t);
            match c.status {
                STATUS_OK => {
                    let want = if x.opcode == OP_NOP { 0 } else { x.len };
                    assert_ok(&c, want);
                }
                STATUS_INVALID_DESCRIPTOR => {
                    assert_eq!(
                        (c.fault_reason, c.bytes),
                        (FAULT_DESCRIPTOR_INVALID, 0),
                        "{x:x?}"
                    )
                }
                STATUS_DMA_ERROR => {
                    assert!(
                        (1..=7).contains(&c.fault_reason)
                            && c.fault_reason != FAULT_DESCRIPTOR_INVALID,
                        "{x:x?}: {c:x?}"
                    );
                    assert!(c.bytes < x.len, "{x:x?}: {c:x?}");
                    let in_range =
                        |base: u64| c.fault_addr >= base && c.fault_addr - base < u64::from(x.len);
                    assert!(in_range(x.src) || in_range(x.dst), "{x:x?}: {c:x?}");
                }
                s => panic!("status {s:#x} for {x:x?}"),
            }
        }
        let errors = d.qread(Q, Q_ERRORS).wrapping_sub(errors_before);
        let count = d.read(REG_FLOG_COUNT).wrapping_sub(count_before);
        assert_eq!(errors, count, "one fault per failed descriptor");
        let recs = d.wait_faults(count);
        for r in &recs {
            assert!((1..=7).contains(&r.reason), "{r:x?}");
            assert_eq!(r.seq, seq);
            seq += 1;
        }
        faults_total += count;
        d.bus.check_canaries();
    }
    assert_eq!(d.read(REG_FLOG_COUNT), faults_total);
    assert_eq!(d.read(REG_FLOG_DROPPED), 0);
    // The fuzz must have exercised the interesting outcomes.
    for reason in [
        FAULT_NOT_PRESENT,
        FAULT_PERMISSION,
        FAULT_MALFORMED_ENTRY,
        FAULT_OUTSIDE_RAM,
        FAULT_IOVA_WIDTH,
    ] {
        assert!(
            modelled[reason as usize] > 5,
            "reason {reason}: {modelled:?}"
        );
    }
    assert!(modelled[0] > 20, "successful reads: {modelled:?}");
}

#[test]
fn pass_through_dma_outside_bus_memory_faults_outside_ram() {
    let mut d = Driver::new();
    d.enable_fault_log(16);
    d.setup_queue(Q, 0, 8);
    let c = d.run(Q, Desc::fill(OUTSIDE, 64, 0));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        OUTSIDE,
        0,
    );
    let r = d.wait_faults(1);
    assert_rec(&r[0], FAULT_OUTSIDE_RAM, ACCESS_WRITE, 0, Q, OUTSIDE, 0);
    assert_eq!((r[0].info, r[0].level), (OUTSIDE, 0));
    // A source that runs off the end of bus memory: nothing beyond it is read, and only
    // whole chunks before it are reported.
    let src = RAM_END - 4096;
    let data = pattern(32, 4096);
    d.bus.write(src, &data);
    let dst = d.bus.alloc_guarded(8192, PAGE_4K);
    let c = d.run(Q, Desc::copy(src, dst, 8192));
    assert_eq!(
        (c.status, c.fault_reason, c.fault_access, c.fault_addr),
        (STATUS_DMA_ERROR, FAULT_OUTSIDE_RAM, 0, RAM_END),
        "{c:x?}"
    );
    assert!(c.bytes == 0 || c.bytes == 4096, "{c:x?}");
    let got = d.bus.read(dst, 8192);
    assert_eq!(got[..c.bytes as usize], data[..c.bytes as usize]);
    assert!(
        got[c.bytes as usize..].iter().all(|&b| b == 0),
        "nothing after the fault"
    );
    let r = d.wait_faults(1);
    assert_eq!(
        (r[0].reason, r[0].info, r[0].iova),
        (FAULT_OUTSIDE_RAM, RAM_END, RAM_END)
    );
    d.bus.check_canaries();
}

#[test]
fn vmm_read_only_memory_is_readable_and_never_written() {
    let mut d = setup();
    d.enable_fault_log(16);
    let data = pattern(30, RO_SIZE as usize);
    d.bus.write(RO_BASE, &data);
    // A level-1 table in the read-only region (walks only read tables) for LARGE.
    let ram_page = d.bus.alloc_guarded(4096, PAGE_4K);
    let page_data = pattern(31, 4096);
    d.bus.write(ram_page, &page_data);
    let l1 = RO_BASE + 0xc000;
    d.bus.write(l1, &[0; 4096]);
    d.bus.write_u64(l1, ram_page | PTE_R);
    d.set_pte(DOM, LARGE, 2, l1 | RW);
    let before = d.bus.read(RO_BASE, RO_SIZE as usize);

    // Pass-through: reads work, writes fault OUTSIDE_RAM.
    d.setup_queue(1, 0, 8);
    let dst = d.bus.alloc_guarded(4096, PAGE_4K);
    assert_ok(&d.run(1, Desc::copy(RO_BASE + 4096, dst, 4096)), 4096);
    assert_eq!(d.bus.read(dst, 4096), data[4096..8192]);
    let c = d.run(1, Desc::fill(RO_BASE + 64, 8, 0));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        RO_BASE + 64,
        0,
    );
    let r = d.wait_faults(1);
    assert_rec(
        &r[0],
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        0,
        1,
        RO_BASE + 64,
        0,
    );
    assert_eq!((r[0].info, r[0].level), (RO_BASE + 64, 0));
    // A completion record there cannot be written: no record, an error, a fault.
    d.submit(1, Desc::nop().cpl(Cpl::At(RO_BASE + 0x100)));
    d.wait_idle(1);
    let r = d.wait_faults(1);
    assert_rec(
        &r[0],
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE | ACCESS_COMPLETION,
        0,
        1,
        RO_BASE + 0x100,
        1,
    );
    eventually_eq("Q_ERRORS", 2, || d.qread(1, Q_ERRORS));

    // Translated: a read-write leaf on a read-only bus page still cannot be written.
    d.map(DOM, SRC, RO_BASE + 8192, 4096, PAGE_4K, RW);
    let tdst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    assert_ok(&d.run(Q, Desc::copy(SRC + 8, DST, 100)), 100);
    assert_eq!(d.bus.read(tdst, 100), data[8192 + 8..8192 + 108]);
    let c = d.run(Q, Desc::copy(DST, SRC + 8, 100));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        SRC + 8,
        0,
    );
    let r = d.wait_faults(1);
    assert_rec(&r[0], FAULT_OUTSIDE_RAM, ACCESS_WRITE, DOM, Q, SRC + 8, 2);
    assert_eq!((r[0].info, r[0].level), (RO_BASE + 8192 + 8, 0));
    // The table in read-only memory is walked.
    let c = d.run(Q, Desc::crc32c(LARGE, 4096));
    assert_ok(&c, 4096);
    assert_eq!(c.result, u64::from(crc32c(&page_data)));

    // A fault log in read-only memory: rejected at enable or failing at the first record.
    d.write(REG_FLOG_CTRL, 0);
    d.write(REG_FLOG_BASE_LO, RO_BASE as u32);
    d.write(REG_FLOG_BASE_HI, (RO_BASE >> 32) as u32);
    d.write(REG_FLOG_SIZE, 8);
    d.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
    let dropped = d.read(REG_FLOG_DROPPED);
    let c = d.run(Q, Desc::crc32c(SRC + 0x10_0000, 4));
    assert_eq!(c.fault_reason, FAULT_NOT_PRESENT);
    eventually_eq("REG_FLOG_DROPPED", dropped + 1, || d.read(REG_FLOG_DROPPED));
    assert_ne!(d.read(REG_FLOG_STATUS) & FLOG_STATUS_ERROR, 0);

    assert!(
        d.bus.read(RO_BASE, RO_SIZE as usize) == before,
        "read-only memory changed"
    );
    d.bus.check_canaries();
}
