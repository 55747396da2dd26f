/*
 * LD_PRELOAD shim used by scripts/brokers for the RocketMQ proxy JVM only.
 *
 * RocketMQ 5.5's proxy binds its gRPC server (NettyServerBuilder.forPort), its remoting server
 * and the broker's HA port to the wildcard address, with no setting to change that.  This shim
 * rewrites a bind() to the IPv4 or IPv6 wildcard address into a bind to loopback, so every
 * port of that process listens on 127.0.0.1 only.  Nothing else is changed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&in4, sizeof in4);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (memcmp(&in6.sin6_addr, &in6addr_any, sizeof in6addr_any) == 0) {
            /* ::ffff:127.0.0.1 keeps IPv4 clients of a dual-stack socket working */
            static const unsigned char mapped_lo[16] = {0, 0, 0, 0, 0, 0, 0, 0,
                                                        0, 0, 0xff, 0xff, 127, 0, 0, 1};
            memcpy(&in6.sin6_addr, mapped_lo, sizeof mapped_lo);
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real_bind(fd, addr, len);
}
