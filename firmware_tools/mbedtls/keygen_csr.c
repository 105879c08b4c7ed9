/*
 * keygen_csr: make a device key pair and a PKCS#10 CSR with mbedTLS 2.28, the way
 * device firmware does for GENERATE_KEY (firmware_tools/PROTOCOL.md, section 3.2).
 *
 *   keygen_csr p256|p384 SUBJECT_CN OUTDIR
 *
 * writes OUTDIR/key.der (the private key, SEC1 ECPrivateKey DER, as
 * mbedtls_pk_write_key_der produces it) and OUTDIR/csr.der (the CSR, DER, as
 * mbedtls_x509write_csr_der produces it: mbedTLS 2.x encodes the CSR's outer
 * ECDSA signatureAlgorithm with a NULL parameter, mbedTLS issue #2924).
 *
 * The iotauth test suite compiles this file against Debian's libmbedtls-dev and
 * the device emulator runs it (--keygen-command), so the station is tested with
 * CSRs made by the real library. Build:
 *
 *   cc -O2 -o keygen_csr keygen_csr.c -lmbedx509 -lmbedcrypto
 */
#include <stdio.h>
#include <string.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/entropy.h>
#include <mbedtls/md.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_csr.h>

static int write_file(const char *dir, const char *name, const unsigned char *data, size_t len)
{
    char path[4096];
    FILE *out;
    if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
        return -1;
    out = fopen(path, "wb");
    if (out == NULL)
        return -1;
    if (fwrite(data, 1, len, out) != len) {
        fclose(out);
        return -1;
    }
    return fclose(out) == 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
    static const char pers[] = "iotauth-keygen-csr";
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
    mbedtls_pk_context key;
    mbedtls_x509write_csr csr;
    mbedtls_ecp_group_id curve;
    mbedtls_md_type_t md;
    unsigned char buf[4096];
    char subject[160];
    int ret = 1, len;

    if (argc != 4 || (strcmp(argv[1], "p256") != 0 && strcmp(argv[1], "p384") != 0)) {
        fprintf(stderr, "usage: %s p256|p384 SUBJECT_CN OUTDIR\n", argv[0]);
        return 2;
    }
    curve = strcmp(argv[1], "p256") == 0 ? MBEDTLS_ECP_DP_SECP256R1 : MBEDTLS_ECP_DP_SECP384R1;
    md = curve == MBEDTLS_ECP_DP_SECP256R1 ? MBEDTLS_MD_SHA256 : MBEDTLS_MD_SHA384;
    if (snprintf(subject, sizeof subject, "CN=%s", argv[2]) >= (int)sizeof subject) {
        fprintf(stderr, "subject too long\n");
        return 2;
    }

    mbedtls_entropy_init(&entropy);
    mbedtls_ctr_drbg_init(&drbg);
    mbedtls_pk_init(&key);
    mbedtls_x509write_csr_init(&csr);

    if (mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, (const unsigned char *)pers,
                              sizeof pers - 1) != 0)
        goto done;
    if (mbedtls_pk_setup(&key, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY)) != 0)
        goto done;
    if (mbedtls_ecp_gen_key(curve, mbedtls_pk_ec(key), mbedtls_ctr_drbg_random, &drbg) != 0)
        goto done;

    len = mbedtls_pk_write_key_der(&key, buf, sizeof buf);
    if (len <= 0 || write_file(argv[3], "key.der", buf + sizeof buf - len, (size_t)len) != 0)
        goto done;

    mbedtls_x509write_csr_set_md_alg(&csr, md);
    mbedtls_x509write_csr_set_key(&csr, &key);
    if (mbedtls_x509write_csr_set_subject_name(&csr, subject) != 0)
        goto done;
    len = mbedtls_x509write_csr_der(&csr, buf, sizeof buf, mbedtls_ctr_drbg_random, &drbg);
    if (len <= 0 || write_file(argv[3], "csr.der", buf + sizeof buf - len, (size_t)len) != 0)
        goto done;
    ret = 0;

done:
    mbedtls_platform_zeroize(buf, sizeof buf);
    mbedtls_x509write_csr_free(&csr);
    mbedtls_pk_free(&key);
    mbedtls_ctr_drbg_free(&drbg);
    mbedtls_entropy_free(&entropy);
    if (ret != 0)
        fprintf(stderr, "keygen_csr: mbedTLS failed\n");
    return ret;
}
