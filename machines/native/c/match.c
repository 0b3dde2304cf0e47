/* Row lookup for provenance's source maps: which row of a table of distinct int16 rows [U, D] each
 * of N query rows [N, D] equals. An open-addressing hash table of T slots (a power of two ≥ 2U,
 * int64, filled with −1 by the caller) is built once (match_build: returns −1 if two table rows are
 * equal, else 0) and probed per query row (match_find: out[i] = the table row, or −1 where none is
 * equal; returns how many found none). Every hit is checked value by value, so a hash collision can
 * never give a wrong match. */
static inline uint64_t row_hash(const int16_t *row, int64_t D)
{
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (int64_t d = 0; d < D; d++) h = (h ^ (uint16_t)row[d]) * 0x100000001B3ull + (h >> 29);
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    return h ^ (h >> 29);
}

int64_t match_build(int64_t U, int64_t D, const int16_t *rows, int64_t T, int64_t *table)
{
    const uint64_t mask = (uint64_t)T - 1;
    uint64_t slot[32];
    for (int64_t g = 0; g < U; g += 32) {  /* hash 32 rows and prefetch their slots, then insert them */
        const int64_t n = U - g < 32 ? U - g : 32;
        for (int64_t i = 0; i < n; i++) {
            slot[i] = row_hash(rows + (g + i) * D, D) & mask;
            __builtin_prefetch(table + slot[i], 1);
        }
        for (int64_t i = 0; i < n; i++) {
            const int16_t *row = rows + (g + i) * D;
            uint64_t s = slot[i];
            while (table[s] >= 0) {
                if (memcmp(rows + table[s] * D, row, (size_t)D * sizeof(int16_t)) == 0) return -1;
                s = (s + 1) & mask;
            }
            table[s] = g + i;
        }
    }
    return 0;
}

/* Look up 32 rows at a time (buf: n rows of D values): hash all and prefetch their slots, then prefetch
 * the table rows the slots name, then compare, so the random reads of a large table overlap. */
static int64_t match_group(int64_t D, const int16_t *rows, uint64_t mask, const int64_t *table, int64_t n,
                           const int16_t *buf, int64_t *out)
{
    uint64_t slot[32];
    int64_t missing = 0;
    for (int64_t i = 0; i < n; i++) {
        slot[i] = row_hash(buf + i * D, D) & mask;
        __builtin_prefetch(table + slot[i]);
    }
    for (int64_t i = 0; i < n; i++)
        if (table[slot[i]] >= 0) __builtin_prefetch(rows + table[slot[i]] * D);
    for (int64_t i = 0; i < n; i++) {
        const int16_t *row = buf + i * D;
        uint64_t s = slot[i];
        int64_t found = -1;
        while (table[s] >= 0) {
            if (memcmp(rows + table[s] * D, row, (size_t)D * sizeof(int16_t)) == 0) {
                found = table[s];
                break;
            }
            s = (s + 1) & mask;
        }
        out[i] = found;
        missing += found < 0;
    }
    return missing;
}

int64_t match_find(int64_t D, const int16_t *rows, int64_t T, const int64_t *table, int64_t N, const int16_t *queries,
                   int64_t *out)
{
    int64_t missing = 0;
    for (int64_t g = 0; g < N; g += 32)
        missing += match_group(D, rows, (uint64_t)T - 1, table, N - g < 32 ? N - g : 32, queries + g * D, out + g);
    return missing;
}

/* match_find for the P×P windows of padded images [B, C, Hp, Wp] whose top-left corners are locs [L, 2]
 * (row i, col j), each flattened channel-major (c, row, col) as patchbank.geometry.patches_at does;
 * out [B, L], image-major. buf: scratch for 32 windows (32·C·P·P values). */
int64_t match_windows(const int16_t *rows, int64_t T, const int64_t *table, int64_t B, int64_t C, int64_t Hp, int64_t Wp,
                      const int16_t *images, int64_t L, const int64_t *locs, int64_t P, int16_t *buf, int64_t *out)
{
    const int64_t D = C * P * P;
    int64_t missing = 0, n = 0, at = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t l = 0; l < L; l++) {
            const int16_t *corner = images + b * C * Hp * Wp + locs[2 * l] * Wp + locs[2 * l + 1];
            int16_t *row = buf + n * D;
            for (int64_t c = 0; c < C; c++)
                for (int64_t i = 0; i < P; i++)
                    memcpy(row + (c * P + i) * P, corner + c * Hp * Wp + i * Wp, (size_t)P * sizeof(int16_t));
            if (++n == 32 || (b == B - 1 && l == L - 1)) {
                missing += match_group(D, rows, (uint64_t)T - 1, table, n, buf, out + at);
                at += n;
                n = 0;
            }
        }
    return missing;
}

/* A stable counting sort: order[cursor[key[i]]++] = i for i = 0..N−1, keys in [0, K); cursor [K] starts
 * at each key's first position (the exclusive cumulative sum of the key counts) and is advanced. */
void counting_order(int64_t N, const int64_t *key, int64_t *cursor, int64_t *order)
{
    for (int64_t i = 0; i < N; i++) order[cursor[key[i]]++] = i;
}

